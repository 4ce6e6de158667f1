"""Device profiles for the hardware-aware planner: what a GPU (or CPU) can hold and how fast it runs.

A ``DeviceProfile`` is data: memory size, memory bandwidth, dense peak throughput per math dtype,
the weight formats it runs natively or through our kernels, and the achieved fraction of the
roofline per kernel family. The shipped profiles live in ``devices.yaml`` next to this file (one
comment per device names the datasheet); ``measure_profile`` times the local device instead, and
``save_profile`` writes a profile to the user directory (``$COMPRESS_HOME/devices``, default
``~/.cache/compress/devices``), where it shadows the builtin of the same name.

Units everywhere: GB = 1e9 bytes, GB/s = 1e9 bytes/s, TFLOPS = 1e12 FLOP/s (TOPS for int8), us =
microseconds. See docs/planner.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.resources
import json
import logging
import os
import platform
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

from ..errors import ConfigError, MissingPathError

log = logging.getLogger(__name__)

PROFILE_VERSION = 1
KINDS = ("gpu", "cpu")
TFLOPS_KEYS = ("fp32", "tf32", "bf16", "fp8", "int8", "fp4")
NATIVE_FORMATS = ("bf16", "fp8", "int8", "nvfp4", "mxfp4")
KERNEL_FORMATS = ("int8", "int4", "int3", "int2", "nvfp4", "mxfp4", "sparse24")
PHASES = ("decode", "prefill")
KERNEL_FAMILIES = ("bf16", "int", "fp4", "sparse24", "attention")
SOURCES = ("datasheet", "measured", "calibrated")
BUILTIN = "builtin"                    # DeviceProfile.origin of a shipped profile
_CATALOG_ONLY_KEYS = ("aliases", "device_names")     # devices.yaml keys that are not profile fields
_MEASURE_HINT = "measure this machine with `compress devices --measure --save [NAME]`"


@dataclasses.dataclass
class DeviceProfile:
    name: str                      # "h100", "h200", "b200", "a100", "l40s", "rtx4090", "cpu"
    description: str               # "NVIDIA H100 SXM5 80GB"
    kind: str                      # "gpu" | "cpu"
    memory_gb: float               # device memory, 1e9 bytes (datasheet, or measured total)
    bandwidth_gbs: float           # memory bandwidth, 1e9 bytes/s
    tflops: dict[str, float]       # dense peak per math dtype (TFLOPS / TOPS); absent = no native math
    native_formats: list[str]      # weight formats whose matmul runs natively on tensor cores
    kernel_formats: list[str]      # weight formats our dequant kernels run (dequantized to bf16 in-kernel)
    efficiency: dict[str, dict[str, float]]    # phase -> kernel family -> achieved roofline fraction
    overhead_us: float = 0.0       # fixed cost per kernel launch, microseconds
    source: str = "datasheet"      # "datasheet" | "measured" | "calibrated"
    notes: str = ""
    # where the profile was read from: "builtin" or a file path; not saved, not compared
    origin: str = dataclasses.field(default="", compare=False, repr=False)

    def __post_init__(self):
        where = f"device profile {self.name!r}" + _origin_label(self.origin)

        def fail(field: str, problem: str, fix: str) -> ConfigError:
            return ConfigError(f"{where}: {field} {problem}; {fix}")

        if not isinstance(self.name, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", self.name):
            raise fail("name", f"must be lowercase letters, digits, '.', '_' or '-', got {self.name!r}",
                       "rename it (the name is also the file name in the user directory)")
        for field in ("description", "notes"):
            if not isinstance(getattr(self, field), str):
                raise fail(field, f"must be a string, got {getattr(self, field)!r}", "quote it")
        if self.kind not in KINDS:
            raise fail("kind", f"must be one of {', '.join(KINDS)}, got {self.kind!r}", "fix the value")
        if self.source not in SOURCES:
            raise fail("source", f"must be one of {', '.join(SOURCES)}, got {self.source!r}", "fix the value")
        self.memory_gb = _positive(self.memory_gb, "memory_gb", fail, "device memory in GB (1e9 bytes)")
        self.bandwidth_gbs = _positive(self.bandwidth_gbs, "bandwidth_gbs", fail, "memory bandwidth in GB/s")
        if not _is_number(self.overhead_us) or self.overhead_us < 0:
            raise fail("overhead_us", f"must be a number >= 0, got {self.overhead_us!r}", "microseconds per launch")
        self.overhead_us = float(self.overhead_us)

        if not isinstance(self.tflops, dict) or not self.tflops:
            raise fail("tflops", f"must be a non-empty mapping dtype -> TFLOPS, got {self.tflops!r}",
                       f"give at least fp32; keys among {', '.join(TFLOPS_KEYS)}")
        for key, value in self.tflops.items():
            if key not in TFLOPS_KEYS:
                raise fail(f"tflops.{key}", "is not a known math dtype",
                           f"use keys among {', '.join(TFLOPS_KEYS)} (leave a dtype out when it has no native math)")
            self.tflops[key] = _positive(value, f"tflops.{key}", fail, "dense peak TFLOPS (no 2:4 doubling)")
        for field, known in (("native_formats", NATIVE_FORMATS), ("kernel_formats", KERNEL_FORMATS)):
            value = getattr(self, field)
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise fail(field, f"must be a list of format names, got {value!r}",
                           f"use names among {', '.join(known)}")
            unknown = [v for v in value if v not in known]
            if unknown:
                raise fail(field, f"has unknown format(s) {', '.join(map(repr, unknown))}",
                           f"use names among {', '.join(known)}")
        if not isinstance(self.efficiency, dict) or set(self.efficiency) != set(PHASES):
            raise fail("efficiency", f"must map exactly the phases {', '.join(PHASES)}, got "
                       f"{sorted(self.efficiency) if isinstance(self.efficiency, dict) else self.efficiency!r}",
                       f"give each phase the families {', '.join(KERNEL_FAMILIES)}")
        for phase, table in self.efficiency.items():
            if not isinstance(table, dict) or set(table) != set(KERNEL_FAMILIES):
                got = sorted(table) if isinstance(table, dict) else table
                raise fail(f"efficiency.{phase}", f"must map exactly the kernel families "
                           f"{', '.join(KERNEL_FAMILIES)}, got {got!r}", "add the missing ones, drop unknown ones")
            for family, value in table.items():
                if not _is_number(value) or not 0 < value <= 1:
                    raise fail(f"efficiency.{phase}.{family}", f"must be in (0, 1], got {value!r}",
                               "it is the achieved fraction of the roofline (0.7 = 70%)")
                table[family] = float(value)

    def to_dict(self) -> dict[str, Any]:
        """The profile as plain data (what ``save_profile`` writes, without the version key)."""
        data = dataclasses.asdict(self)
        del data["origin"]
        return data

    @classmethod
    def from_dict(cls, data: Any, *, origin: str = "") -> DeviceProfile:
        """Build and validate a profile from a mapping; unknown or missing keys are ConfigErrors."""
        label = (f"device profile {data.get('name', '?')!r}" if isinstance(data, dict) else "device profile") \
            + _origin_label(origin)
        if not isinstance(data, dict):
            raise ConfigError(f"{label}: expected a mapping of profile fields, got {type(data).__name__}")
        fields = {f.name for f in dataclasses.fields(cls) if f.name != "origin"}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{label}: unknown field(s) {', '.join(unknown)}; "
                              f"the fields are {', '.join(sorted(fields))}")
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ConfigError(f"{label}: missing field(s) {', '.join(missing)}; add them (docs/planner.md lists each)")
        return cls(**data, origin=origin)


def _origin_label(origin: str) -> str:
    return " (builtin, compress/plan/devices.yaml)" if origin == BUILTIN else f" ({origin})" if origin else ""


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _positive(value: Any, field: str, fail: Callable[..., ConfigError], meaning: str) -> float:
    if not _is_number(value) or not value > 0:
        raise fail(field, f"must be a positive number, got {value!r}", f"it is the {meaning}")
    return float(value)


# ---------------------------------------------------------------------------------------- files

def _normalize(name: str) -> str:
    """'NVIDIA GeForce RTX_4090' -> 'rtx-4090': lowercase, spaces/underscores to '-', vendor prefixes off."""
    text = re.sub(r"[\s_]+", "-", name.strip().lower())
    for prefix in ("nvidia-", "geforce-"):
        text = text.removeprefix(prefix)
    return text


def _read_yaml(text: str, where: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML ({exc})") from None


def _check_version(data: dict, where: str) -> None:
    version = data.get("version")
    if version != PROFILE_VERSION:
        raise ConfigError(f"{where}: device profile version {version!r} is not supported; this compress reads "
                          f"version {PROFILE_VERSION} (add `version: {PROFILE_VERSION}`)")


def _builtin_catalog() -> tuple[dict[str, DeviceProfile], dict[str, str], dict[str, list[str]]]:
    """(profiles by name, alias -> name, name -> device-name regexes) from the shipped devices.yaml."""
    resource = importlib.resources.files("compress.plan").joinpath("devices.yaml")
    where = "compress/plan/devices.yaml"
    data = _read_yaml(resource.read_text(encoding="utf-8"), where)
    if not isinstance(data, dict) or not isinstance(data.get("profiles"), list):
        raise ConfigError(f"{where}: expected `version` and a `profiles` list")
    _check_version(data, where)
    profiles: dict[str, DeviceProfile] = {}
    aliases: dict[str, str] = {}
    device_names: dict[str, list[str]] = {}
    for entry in data["profiles"]:
        entry = dict(entry)
        extra = {key: entry.pop(key, []) for key in _CATALOG_ONLY_KEYS}
        profile = DeviceProfile.from_dict(entry, origin=BUILTIN)
        if profile.name in profiles:
            raise ConfigError(f"{where}: profile {profile.name!r} is defined twice")
        profiles[profile.name] = profile
        device_names[profile.name] = list(extra["device_names"])
        for alias in extra["aliases"]:
            aliases[_normalize(str(alias))] = profile.name
    return profiles, aliases, device_names


def builtin_profiles() -> dict[str, DeviceProfile]:
    """The shipped profiles (devices.yaml), by name."""
    return _builtin_catalog()[0]


def user_profile_dir() -> Path:
    """Where saved profiles live: ``$COMPRESS_HOME/devices``, default ``~/.cache/compress/devices``."""
    home = os.environ.get("COMPRESS_HOME")
    return (Path(home) if home else Path.home() / ".cache" / "compress") / "devices"


def _read_profile_file(path: Path) -> DeviceProfile:
    data = _read_yaml(path.read_text(encoding="utf-8"), str(path))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a device profile file is a mapping of fields, got {type(data).__name__}")
    _check_version(data, str(path))
    data = {k: v for k, v in data.items() if k != "version"}
    return DeviceProfile.from_dict(data, origin=str(path))


def _user_profiles() -> dict[str, DeviceProfile]:
    folder = user_profile_dir()
    if not folder.is_dir():
        return {}
    profiles = {}
    for path in sorted(folder.glob("*.yaml")):
        profile = _read_profile_file(path)
        profiles[profile.name] = profile
    return profiles


def _looks_like_path(text: str) -> bool:
    return text.endswith((".yaml", ".yml")) or os.sep in text or "/" in text


def load_profile(name_or_path: str) -> DeviceProfile:
    """A profile by file path, or by name: the user directory first (saved / measured profiles shadow
    the builtins), then the builtins; aliases ("H100", "nvidia-h100", "4090", ...) are accepted."""
    if _looks_like_path(name_or_path):
        path = Path(name_or_path).expanduser()
        if not path.is_file():
            raise MissingPathError(f"device profile file {path} does not exist; give a profile name "
                                   f"(`compress devices` lists them) or the path of a saved profile")
        return _read_profile_file(path)
    builtins, aliases, _ = _builtin_catalog()
    key = _normalize(name_or_path)
    canonical = aliases.get(key, key)
    user = _user_profiles()
    for candidate in dict.fromkeys((key, canonical)):
        if candidate in user:
            return user[candidate]
        if candidate in builtins:
            return builtins[candidate]
    known = sorted(set(builtins) | set(user))
    raise ConfigError(f"unknown device profile {name_or_path!r}; known: {', '.join(known)} "
                      f"(aliases such as H100, nvidia-h100, 4090 work too). For another device, {_MEASURE_HINT}, "
                      f"or pass the path of a profile YAML")


def list_profiles() -> list[DeviceProfile]:
    """Builtins then user profiles; a user profile replaces the builtin of the same name (its
    ``origin`` is its file, which ``format_profiles`` marks)."""
    merged = dict(builtin_profiles())
    merged.update(_user_profiles())
    return list(merged.values())


def _to_yaml(data: dict) -> str:
    """Field order kept; innermost lists and mappings on one line, as in devices.yaml."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=120)


def save_profile(profile: DeviceProfile, path: str | os.PathLike | None = None) -> Path:
    """Write ``profile`` as YAML (atomically: a temp file, then ``os.replace``); default path
    ``user_profile_dir() / f"{profile.name}.yaml"``. Returns the path."""
    target = Path(path) if path is not None else user_profile_dir() / f"{profile.name}.yaml"
    target.parent.mkdir(parents=True, exist_ok=True)
    header = (f"# compress device profile {profile.name!r} ({profile.source}); written "
              f"{datetime.datetime.now().isoformat(timespec='seconds')}. Fields: docs/planner.md\n")
    text = header + _to_yaml({"version": PROFILE_VERSION, **profile.to_dict()})
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


# ---------------------------------------------------------------------------------- local device

def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device {device!r} is not a torch device ({exc}); use cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {device!r}: only cpu and cuda devices can be profiled")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {device!r}: no CUDA GPU is visible to torch; use --device cpu")
    return dev


def _builtin_for_gpu_name(gpu_name: str) -> str | None:
    """The builtin whose device_names regex matches ``torch.cuda.get_device_name`` text, or None."""
    _, _, device_names = _builtin_catalog()
    for name, patterns in device_names.items():
        if any(re.search(p, gpu_name, flags=re.IGNORECASE) for p in patterns):
            return name
    return None


def _default_name(dev: torch.device) -> tuple[str, str | None]:
    """(profile name for this device, matching builtin or None)."""
    if dev.type == "cpu":
        return "cpu", "cpu"
    gpu_name = torch.cuda.get_device_name(dev)
    builtin = _builtin_for_gpu_name(gpu_name)
    return (builtin or _normalize(re.sub(r"[^\w\s-]", "", gpu_name))), builtin


def match_local_profile(device: str | torch.device | None = None) -> DeviceProfile:
    """The profile for the device we run on: a saved user profile for it if any, else the builtin
    matching ``torch.cuda.get_device_name``, else (no GPU) the ``cpu`` profile."""
    dev = _resolve_device(device)
    name, builtin = _default_name(dev)
    user = _user_profiles()
    if name in user:
        return user[name]
    if builtin is not None:
        return builtin_profiles()[builtin]
    raise ConfigError(f"no device profile matches GPU {torch.cuda.get_device_name(dev)!r}; {_MEASURE_HINT} "
                      f"(it is saved as {name!r}), or pass a builtin name close to it")


# ----------------------------------------------------------------------------------- measurement

def _sig(value: float, digits: int = 4) -> float:
    """``value`` rounded to ``digits`` significant digits (a measurement is not more precise)."""
    return float(f"{value:.{digits}g}")


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _median_time(fn: Callable[[], Any], dev: torch.device, seconds: float, *, min_repeats: int = 3,
                 max_repeats: int = 50) -> float:
    """Median wall time of one ``fn()`` in seconds: one warm-up call, then as many timed calls as
    fit in ``seconds`` (between ``min_repeats`` and ``max_repeats``)."""
    _sync(dev)
    start = time.perf_counter()
    fn()
    _sync(dev)
    first = time.perf_counter() - start
    repeats = int(min(max_repeats, max(min_repeats, seconds / max(first, 1e-9))))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(dev)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _measure_bandwidth(dev: torch.device, nbytes: int, seconds: float) -> float:
    """GB/s of a device-to-device copy of ``nbytes``, counting the read and the write."""
    numel = nbytes // 4
    src = torch.ones(numel, dtype=torch.float32, device=dev)
    dst = torch.empty_like(src)
    t = _median_time(lambda: dst.copy_(src), dev, seconds)
    return 2 * numel * 4 / t / 1e9


def _matmul_fn(dtype_key: str, n: int, dev: torch.device) -> Callable[[], Any] | None:
    """A closure computing one (n, n) @ (n, n) product in ``dtype_key``, or None when unsupported."""
    if dtype_key in ("fp32", "bf16"):
        dtype = torch.float32 if dtype_key == "fp32" else torch.bfloat16
        a = torch.randn(n, n, device=dev).to(dtype)
        b = torch.randn(n, n, device=dev).to(dtype)
        return lambda: torch.mm(a, b)
    if dev.type != "cuda":
        return None
    if dtype_key == "int8":
        a = torch.randint(-8, 8, (n, n), dtype=torch.int8, device=dev)
        b = torch.randint(-8, 8, (n, n), dtype=torch.int8, device=dev)
        return lambda: torch._int_mm(a, b)
    if dtype_key == "fp8":
        a = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn)
        b = torch.randn(n, n, device=dev).to(torch.float8_e4m3fn).t()      # column-major, as cuBLASLt wants
        one = torch.ones((), device=dev)
        return lambda: torch._scaled_mm(a, b, scale_a=one, scale_b=one, out_dtype=torch.bfloat16)
    return None


def _measure_matmul(dtype_key: str, dev: torch.device, n0: int, n_max: int, seconds: float) -> tuple[float, int] | None:
    """(TFLOPS, n) of square matmuls in ``dtype_key``: n doubles from ``n0`` until one call takes
    ``seconds / 20`` or n reaches ``n_max``; None when the dtype has no matmul here."""
    n = n0
    while True:
        try:
            fn = _matmul_fn(dtype_key, n, dev)
            if fn is None:
                return None
            t = _median_time(fn, dev, 0.0)              # 3 calls: one slow call must not stop the search
        except (RuntimeError, TypeError, NotImplementedError) as exc:   # no kernel for this dtype / GPU
            log.info("%s matmul not measured on %s: %s", dtype_key, dev, str(exc).splitlines()[0])
            return None
        if t >= seconds / 20 or n >= n_max:
            break
        n *= 2
    t = _median_time(fn, dev, seconds)
    return 2 * n**3 / t / 1e12, n


def _measure_overhead_us(dev: torch.device, seconds: float, launches: int = 200) -> float:
    """Microseconds per launch of a tiny kernel (one-element add), issued back to back."""
    x = torch.zeros(1, device=dev)

    def burst():
        for _ in range(launches):
            x.add_(1)

    return _median_time(burst, dev, seconds) / launches * 1e6


def _memory_gb(dev: torch.device) -> float:
    if dev.type == "cuda":
        return torch.cuda.get_device_properties(dev).total_memory / 1e9
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / 1e9          # the value is in kB (KiB)
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9


def _cpu_description() -> str:
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def _gpu_base(dev: torch.device) -> DeviceProfile:
    """Formats and efficiency for a GPU no builtin matches: native formats from the compute
    capability, the GPU efficiency defaults of the h100 profile."""
    major, minor = torch.cuda.get_device_capability(dev)
    cc = major * 10 + minor
    native = ["bf16", "int8"] if cc >= 80 else ["int8"] if cc >= 75 else []
    native += ["fp8"] if cc >= 89 else []
    native += ["nvfp4", "mxfp4"] if cc >= 100 else []
    h100 = builtin_profiles()["h100"]
    return dataclasses.replace(h100, name="gpu-defaults", native_formats=native or ["bf16"],
                               notes=f"native formats from compute capability {major}.{minor}, "
                                     f"efficiency = the builtin GPU defaults")


def measure_profile(device: str | torch.device | None = None, *, name: str | None = None, seconds: float = 1.0,
                    base: DeviceProfile | None = None, quick: bool = False) -> DeviceProfile:
    """Measure the local device into a profile (source "measured").

    Memory bandwidth: a device-to-device copy (read + write bytes) of a buffer large enough to
    defeat caches (1 GiB on CUDA, 256 MiB on CPU); matmul TFLOPS for fp32 and bf16 (and int8 /
    fp8 on CUDA where torch has the kernel); memory size; per-launch overhead of tiny kernels.
    Each number is the median of repeats after a warm-up, timed for about ``seconds``.

    ``base`` (default: the builtin matching the GPU name, or ``cpu``) supplies what cannot be timed:
    native / kernel formats, efficiency, and throughput of dtypes not measured here (e.g. fp4).
    ``name`` defaults to the base's name, so a saved measurement shadows that builtin.
    ``quick`` uses tiny sizes (tests, smoke runs): its numbers are not representative.
    """
    dev = _resolve_device(device)
    default_name, builtin = _default_name(dev)
    if name is None:
        name = base.name if base is not None else default_name
    if base is None:
        base = builtin_profiles()[builtin] if builtin is not None else _gpu_base(dev)
    cuda = dev.type == "cuda"
    copy_bytes = (8 << 20) if quick else (1 << 30) if cuda else (256 << 20)
    if cuda:
        free, _ = torch.cuda.mem_get_info(dev)
        copy_bytes = min(copy_bytes, free // 4)
    n0, n_max = (64, 256) if quick else (1024, 8192) if cuda else (256, 2048)
    seconds = min(seconds, 0.1) if quick else seconds

    started = time.perf_counter()
    with torch.inference_mode():
        bandwidth = _measure_bandwidth(dev, copy_bytes, seconds)
        tflops, sizes = {}, {}
        for key in ("fp32", "bf16", "int8", "fp8"):
            result = _measure_matmul(key, dev, n0, n_max, seconds)
            if result is not None:
                tflops[key], sizes[key] = result
        overhead = _measure_overhead_us(dev, min(seconds, 0.2))
    elapsed = time.perf_counter() - started

    if "fp32" not in tflops:
        raise ConfigError(f"could not time an fp32 matmul on {dev}; check that torch works there")
    kept = {k: v for k, v in base.tflops.items() if k not in tflops}
    description = _cpu_description() if not cuda else torch.cuda.get_device_name(dev)
    notes = (f"measured {datetime.date.today().isoformat()} with torch {torch.__version__} in {elapsed:.1f} s"
             f"{' (quick: tiny sizes)' if quick else ''}: copy {copy_bytes >> 20} MiB, matmul n = "
             + ", ".join(f"{k} {n}" for k, n in sizes.items())
             + (f"; {', '.join(kept)} TFLOPS from {base.name} ({base.source})" if kept else "")
             + f"; formats and efficiency from {base.name} (uncalibrated)"
             + (f": {base.notes}" if base.name == "gpu-defaults" else ""))
    return DeviceProfile(
        name=name,
        description=description, kind="gpu" if cuda else "cpu",
        memory_gb=_sig(_memory_gb(dev)), bandwidth_gbs=_sig(bandwidth),
        tflops={**{k: _sig(v) for k, v in tflops.items()}, **kept},
        native_formats=list(base.native_formats), kernel_formats=list(base.kernel_formats),
        efficiency={phase: dict(table) for phase, table in base.efficiency.items()},
        overhead_us=_sig(overhead), source="measured", notes=notes)


# ------------------------------------------------------------------------------------- display

def format_profiles(profiles: list[DeviceProfile]) -> str:
    """An aligned text table; a profile read from a user file is marked with '*'."""
    header = ["name", "description", "mem GB", "GB/s", "bf16", "fp8", "int8", "fp4", "native", "source"]
    rows = []
    for p in profiles:
        mark = "*" if p.origin and p.origin != BUILTIN else ""
        rows.append([p.name + mark, p.description, f"{p.memory_gb:g}", f"{p.bandwidth_gbs:g}",
                     *(f"{p.tflops[k]:g}" if k in p.tflops else "-" for k in ("bf16", "fp8", "int8", "fp4")),
                     ",".join(p.native_formats) or "-", p.source])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7}
    lines = ["  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("TFLOPS dense (TOPS for int8); " + ("* = saved profile in " + str(user_profile_dir())
                                                     if any(r[0].endswith("*") for r in rows) else
                                                     f"saved profiles go to {user_profile_dir()}"))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ CLI

def add_devices_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``devices`` subcommand to ``compress``'s subparsers."""
    d = sub.add_parser("devices", help="list device profiles the planner knows; --measure to profile this machine",
                       description="List the device profiles the planner knows (builtin and saved), show one, "
                                   "or measure this machine.")
    d.add_argument("--measure", action="store_true",
                   help="time this machine (memory bandwidth, matmul TFLOPS, launch overhead) and print the profile")
    d.add_argument("--device", metavar="DEV", help="device to --measure: cpu, cuda, cuda:N (default: cuda if present)")
    d.add_argument("--save", nargs="?", const="", default=None, metavar="NAME",
                   help=f"with --measure: save the profile to the user directory ({user_profile_dir()}), "
                        "as NAME (default: the matching builtin's name, which it then shadows)")
    d.add_argument("--seconds", type=float, default=1.0, help="with --measure: timing per measurement (default 1)")
    d.add_argument("--show", metavar="NAME", help="print one profile (name, alias or YAML path) as YAML")
    d.add_argument("--json", action="store_true", help="print JSON instead of a table / YAML")
    return d


def run_devices(args: argparse.Namespace) -> int:
    """The ``compress devices`` command; errors raise ConfigError for the CLI to print."""
    if not args.measure:
        for flag, value in (("--save", args.save), ("--device", args.device)):
            if value is not None:
                raise ConfigError(f"{flag} goes with --measure (it saves / picks the device to measure); add --measure")
    if args.show and args.measure:
        raise ConfigError("--show prints a known profile and --measure makes a new one: give one of them")
    if args.show or args.measure:
        if args.show:
            profile = load_profile(args.show)
        else:
            profile = measure_profile(args.device, name=args.save or None, seconds=args.seconds)
        if args.json:
            print(json.dumps(profile.to_dict(), indent=2))
        else:
            print(_to_yaml(profile.to_dict()).rstrip())
        if args.measure and args.save is not None:
            path = save_profile(profile)
            shadows = " (shadows the builtin of that name)" if profile.name in builtin_profiles() else ""
            print(f"saved {profile.name!r} to {path}{shadows}")
        return 0
    profiles = list_profiles()
    if args.json:
        print(json.dumps([{**p.to_dict(), "origin": p.origin} for p in profiles], indent=2))
    else:
        print(format_profiles(profiles))
    return 0
