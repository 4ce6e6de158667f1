"""Typed, versioned method configs and the one registry that maps method names onto them.

Every method (``gptq``, ``rtn``, later ``wanda``, ``sparsegpt`` ...) is a dataclass deriving from
``MethodConfig``. A recipe pass ``{"method": "gptq", "bits": 4}`` maps one-to-one onto
``GPTQConfig(bits=4)``; unknown keys are rejected by name, values are type-checked, and
``to_dict``/``from_dict`` round-trip.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, ClassVar

from .errors import ConfigError

_REGISTRY: dict[str, type[MethodConfig]] = {}


def register_method(cls: type[MethodConfig]) -> type[MethodConfig]:
    """Class decorator: make ``cls`` reachable by its ``method`` name. Duplicates are an error."""
    name = cls.method
    if not name:
        raise TypeError(f"{cls.__name__} has no `method` name")
    if name in _REGISTRY:
        raise TypeError(f"method {name!r} is registered twice ({_REGISTRY[name].__name__} and {cls.__name__})")
    _REGISTRY[name] = cls
    return cls


def registered_methods() -> dict[str, type[MethodConfig]]:
    return dict(_REGISTRY)


def config_from_dict(data: dict[str, Any], where: str = "config") -> MethodConfig:
    """Build the config a dict names with its ``method`` key (as recipes write passes)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping with a 'method' key, got {type(data).__name__}")
    method = data.get("method")
    if method is None:
        raise ConfigError(f"{where}: missing 'method'; one of {sorted(_REGISTRY)}")
    if method not in _REGISTRY:
        raise ConfigError(f"{where}: unknown method {method!r}{_suggest(str(method), _REGISTRY)}; "
                          f"known methods: {sorted(_REGISTRY)}")
    rest = {k: v for k, v in data.items() if k != "method"}
    return _REGISTRY[method].from_dict(rest, where=f"{where} ({method})")


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
