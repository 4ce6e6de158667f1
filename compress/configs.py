"""Typed, versioned method configs and the one registry of methods.

Every method (``gptq``, ``rtn``, ``wanda``, ``lora`` ...) is a dataclass deriving from ``MethodConfig``
plus one ``register_method`` call beside its handler, which says everything the rest of compress needs
to know about it: its name (the config's ``method``), the handler that applies it, which entry call
takes it (``area``), whether a given config needs calibration data, which statistics it collects in
the layer walk, and which extra options the recipe runner must hand its handler. ``compress.apply``,
``compress.quantize``/``prune``/``distill``, the CLI and recipes read this registry and nothing else::

    register_method(GPTQConfig, quantize_weights, area="quantize", statistics="hessian")

A recipe pass ``{"method": "gptq", "bits": 4}`` maps one-to-one onto ``GPTQConfig(bits=4)``; unknown
keys are rejected by name, values are type-checked, and ``to_dict``/``from_dict`` round-trip.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Callable
from typing import Any, ClassVar

from .errors import ConfigError

# Which public entry call accepts a method's configs (``compress.apply`` accepts all of them):
# quantize -> compress.quantize, prune -> compress.prune, distill -> compress.distill; retrain has none.
AREAS = ("quantize", "prune", "retrain", "distill")
# What a method may observe in the layer walk (informational; the method builds its own statistics).
STATISTICS = (None, "input", "hessian", "activation", "layer", "routing")
# Options the recipe runner knows how to supply, beyond the engine's (device, batch_size, progress):
# teacher: the uncompressed model or its cached targets; state_path: a file for resumable training state.
RUNNER_OPTIONS = ("teacher", "state_path")

# handler(model, cfg, calib, *, device, batch_size, progress, **options) -> records (a dict per module,
# or an object with ``to_dict``)
Handler = Callable[..., Any]


@dataclasses.dataclass(frozen=True)
class Method:
    """One registered method: what api, CLI and recipe know about it."""

    name: str
    config: type[MethodConfig]
    handler: Handler
    area: str
    needs_data: Callable[[MethodConfig], bool]
    statistics: str | None = None
    options: tuple[str, ...] = ()


_METHODS: dict[str, Method] = {}


def register_method(config: type[MethodConfig], handler: Handler, *, area: str,
                    needs_data: bool | Callable[[MethodConfig], bool] = True, statistics: str | None = None,
                    options: tuple[str, ...] = ()) -> Method:
    """Register ``config``'s method once: its handler, its entry ``area`` (one of AREAS), whether a
    config needs calibration data (a bool, or a function of the config), the ``statistics`` it
    collects (one of STATISTICS) and the runner ``options`` its handler takes (from RUNNER_OPTIONS).
    Registering a name or a config type twice is an error."""
    if not (isinstance(config, type) and issubclass(config, MethodConfig)):
        raise TypeError(f"register_method takes a MethodConfig subclass, got {config!r}")
    name = config.method
    if not name:
        raise TypeError(f"{config.__name__} has no `method` name (set the class variable `method`)")
    if name in _METHODS:
        raise TypeError(f"method {name!r} is registered twice ({_METHODS[name].config.__name__} and "
                        f"{config.__name__})")
    if any(m.config is config for m in _METHODS.values()):
        raise TypeError(f"{config.__name__} is registered already")
    if not callable(handler):
        raise TypeError(f"the handler of {name!r} must be callable, got {handler!r}")
    if area not in AREAS:
        raise TypeError(f"area of {name!r} must be one of {AREAS}, got {area!r}")
    if statistics not in STATISTICS:
        raise TypeError(f"statistics of {name!r} must be one of {STATISTICS}, got {statistics!r}")
    unknown = [o for o in options if o not in RUNNER_OPTIONS]
    if unknown:
        raise TypeError(f"options {unknown} of {name!r} are not supplied by the runner; known: {RUNNER_OPTIONS}")
    needs = needs_data if callable(needs_data) else (lambda cfg, value=bool(needs_data): value)
    method = Method(name, config, handler, area, needs, statistics, tuple(options))
    _METHODS[name] = method
    return method


def unregister_method(name: str) -> None:
    """Remove a registration (for tests and plugins that register temporarily)."""
    _METHODS.pop(name, None)


def method_of(cfg: MethodConfig | type | str) -> Method:
    """The registration of a config, config type or method name; ConfigError when there is none."""
    if isinstance(cfg, str):
        found = _METHODS.get(cfg)
        what = repr(cfg)
    else:
        cls = cfg if isinstance(cfg, type) else type(cfg)
        found = next((m for m in _METHODS.values() if m.config is cls), None)
        what = cls.__name__
    if found is None:
        raise ConfigError(f"no registered method for {what}; known methods: {sorted(_METHODS)} "
                          f"(register one with compress.configs.register_method)")
    return found


def methods(area: str | None = None) -> list[Method]:
    """The registered methods, in registration order; only those of ``area`` when given."""
    return [m for m in _METHODS.values() if area is None or m.area == area]


def registered_methods() -> dict[str, type[MethodConfig]]:
    """Method name -> config type, for every registered method."""
    return {name: m.config for name, m in _METHODS.items()}


def config_from_dict(data: dict[str, Any], where: str = "config") -> MethodConfig:
    """Build the config a dict names with its ``method`` key (as recipes write passes)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'method' key, got {type(data).__name__}")
    method = data.get("method")
    if method is None:
        raise ConfigError(f"{where}: missing 'method'; one of {sorted(_METHODS)}")
    if method not in _METHODS:
        raise ConfigError(f"{where}: unknown method {method!r}{_suggest(str(method), _METHODS)}; "
                          f"known methods: {sorted(_METHODS)}")
    rest = {k: v for k, v in data.items() if k != "method"}
    return _METHODS[method].config.from_dict(rest, where=f"{where} ({method})")


@dataclasses.dataclass
class MethodConfig:
    """Base of all method configs: name, version, validation and a dict round trip."""

    method: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError for values that are out of range. Subclasses extend this."""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"method": self.method}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> MethodConfig:
        data = {k: v for k, v in data.items() if k != "method"}
        return build_dataclass(cls, data, where)


def build_dataclass(cls: type, data: dict[str, Any], where: str) -> Any:
    """``cls(**data)`` after rejecting unknown keys by name and type-checking every value."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(f"{where}: unknown key {key!r}{_suggest(str(key), fields)}; "
                              f"valid keys: {sorted(fields)}")
        kwargs[key] = check_type(value, hints[key], f"{where}: field {key!r}")
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING and n not in kwargs]
    if required:
        raise ConfigError(f"{where}: missing required key(s) {required}")
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


def check_type(value: Any, hint: Any, where: str) -> Any:
    """Check ``value`` against a simple type hint (int, float, bool, str, X | None, list[str],
    dict[str, X], Literal[...]); return it (ints are accepted for floats, lists for tuples; a
    mapping keeps its order)."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return check_type(value, arg, where)
            except ConfigError as exc:
                errors.append(str(exc))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {hint}")
    if origin is typing.Literal:
        if value not in args:
            raise ConfigError(f"{where} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [check_type(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        key_hint, value_hint = args if args else (Any, Any)
        return {check_type(k, key_hint, f"{where} key {k!r}"): check_type(v, value_hint, f"{where}[{k!r}]")
                for k, v in value.items()}
    if hint is Any:
        return value
    if hint is dict and not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{where} must be {hint.__name__}, got {value!r}")
    return value


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
