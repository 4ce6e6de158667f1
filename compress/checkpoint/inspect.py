"""What a checkpoint holds, read from its config and safetensors headers (no tensor data)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

from safetensors import safe_open

from ..errors import CheckpointError, MissingPathError
from ..kv.config import KVCacheConfig
from .adapter import CONFIG_KEY as ADAPTER_KEY
from .adapter import summarize_adapter
from .safetensors_io import check_directory, directory_bytes, read_header


def inspect_checkpoint(path: str | Path) -> dict:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise MissingPathError(f"no checkpoint directory at {path}")
    config_path = path / "config.json"
    if not config_path.is_file():
        raise CheckpointError(f"{path} has no config.json; not a checkpoint directory")
    config = json.loads(config_path.read_text())
    files = check_directory(path)
    tensors: dict[str, dict] = {}
    for f in files:
        tensors.update({k: v for k, v in read_header(f).items() if k != "__metadata__"})
    weight_bytes = sum(f.stat().st_size for f in files)
    qc = config.get("quantization_config") or {}
    info = {
        "path": str(path),
        "model_type": config.get("model_type"),
        "architectures": config.get("architectures"),
        "format": qc.get("format") or ("dense" if not qc else qc.get("quant_method")),
        "quant_method": qc.get("quant_method"),
        "dtype": config.get("dtype") or config.get("torch_dtype"),
        "files": [f.name for f in files],
        "tensors": len(tensors),
        "weights_bytes": weight_bytes,
        "disk_bytes": directory_bytes(path),
        "schemes": [],
        "ignore": qc.get("ignore", []),
        "kv_cache": config.get("compress_kv_cache"),
        "kv_cache_scheme": qc.get("kv_cache_scheme"),
        # Kept apart from "parameters" and "weights_bytes", which describe the standard checkpoint.
        "adapter": summarize_adapter(path, config[ADAPTER_KEY], str(config_path)) if config.get(ADAPTER_KEY)
        else None,
    }
    sparse = (config.get("compress_sparsity") or {}).get("modules") or {}
    packed = {k[: -len(".weight_packed")]: v for k, v in tensors.items()
              if k.endswith(".weight_packed") and k[: -len(".weight_packed")] not in sparse}
    w8a8 = _w8a8_modules(tensors)
    packed.update(w8a8)
    params = 0
    for key, v in tensors.items():
        if key.endswith((".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_packed",
                         ".weight_global_scale", ".input_global_scale", ".weight_g_idx", ".k_scale", ".v_scale",
                         ".weight_values", ".weight_meta", ".input_scale")):
            continue
        if key.endswith(".weight") and key[: -len(".weight")] in w8a8:
            continue                   # counted with the quantized modules below
        params += math.prod(v["shape"])
    quant_params = 0
    partial = 0
    for group in (qc.get("config_groups") or {}).values():
        w = group.get("weights") or {}
        a = group.get("input_activations") or {}
        info["schemes"].append({
            "targets": group.get("targets"), "format": group.get("format") or qc.get("format"),
            "bits": w.get("num_bits"), "type": w.get("type"), "strategy": w.get("strategy"),
            "group_size": w.get("group_size"), "symmetric": w.get("symmetric"), "scale_dtype": w.get("scale_dtype"),
            "actorder": w.get("actorder"), "observer": w.get("observer"),
            "activations": f"{a.get('type')}{a.get('num_bits')} {a.get('strategy')} dynamic={a.get('dynamic')}"
            if a else None})
    shapes = {**_weight_shapes(files, tensors), **{m: tuple(v["shape"]) for m, v in w8a8.items()}}
    for s in info["schemes"]:
        s.update(modules=0, parameters=0, bytes=0, module_names=[])
    for module in packed:
        out_features, in_features = shapes[module]
        quant_params += out_features * in_features
        scheme = _scheme_for(module, info["schemes"])
        if scheme.get("group_size") and in_features % scheme["group_size"]:
            partial += 1
        if scheme:                     # per-format totals: what a mixed-precision checkpoint holds
            scheme["modules"] += 1
            scheme["parameters"] += out_features * in_features
            scheme["bytes"] += _packed_bytes(module, tensors)
            scheme["module_names"].append(module)
    for s in info["schemes"]:
        s["bits_per_weight"] = 8 * s.pop("bytes") / s["parameters"] if s["parameters"] else None
        if len(info["schemes"]) == 1:
            del s["module_names"]      # all of them: quantized_modules says how many
    sparse_params = sparse_bytes = 0
    for module in sparse:
        out_features, in_features = shapes.get(module, (0, 0))
        sparse_params += out_features * in_features
        sparse_bytes += sum(math.prod(tensors[f"{module}.{t}"]["shape"]) * _width(tensors[f"{module}.{t}"]["dtype"])
                            for t in ("weight_values", "weight_packed", "weight_scale", "weight_meta")
                            if f"{module}.{t}" in tensors)
    params += sparse_params
    info["sparsity"] = None if not sparse else {
        "format": config["compress_sparsity"].get("format"), "version": config["compress_sparsity"].get("version"),
        "pattern": config["compress_sparsity"].get("pattern"), "modules": len(sparse),
        "values": sorted({str(m.get("values")) for m in sparse.values()}),
        "bits_per_weight": 8 * sparse_bytes / sparse_params if sparse_params else None}
    info["quantized_modules"] = len(packed)
    info["partial_group_modules"] = partial
    info["parameters"] = params + quant_params
    info["quantized_parameters"] = quant_params
    info["bits_per_quantized_weight"] = (
        8 * sum(_packed_bytes(m, tensors) for m in packed) / quant_params if quant_params else None)
    return info


def _packed_bytes(module: str, tensors: dict[str, dict]) -> int:
    """Bytes of a packed module's codes, scales and zero points (W8A8: its unpacked codes ``weight``)."""
    parts = ("weight_packed", "weight_scale", "weight_zero_point")
    if f"{module}.weight_packed" not in tensors:
        parts += ("weight",)
    return sum(math.prod(tensors[f"{module}.{s}"]["shape"]) * _width(tensors[f"{module}.{s}"]["dtype"])
               for s in parts if f"{module}.{s}" in tensors)


def _w8a8_modules(tensors: dict[str, dict]) -> dict[str, dict]:
    """module -> header of its ``weight``, for the W8A8 modules: float8 or int8 ``weight`` codes
    beside a ``weight_scale`` (float-quantized / int-quantized), dense (out, in)."""
    return {k[: -len(".weight")]: v for k, v in tensors.items()
            if k.endswith(".weight") and v["dtype"] in ("F8_E4M3", "I8")
            and f"{k[: -len('.weight')]}.weight_scale" in tensors}


def _weight_shapes(files, tensors: dict[str, dict]) -> dict[str, tuple[int, int]]:
    """module -> dense (out, in): from the tiny ``weight_shape`` tensors (integer formats), else from
    FP4's uint8 ``weight_packed`` (out, in/2), which carries no weight_shape."""
    shapes = {}
    for key, v in tensors.items():
        if key.endswith(".weight_packed") and v["dtype"] == "U8":
            shapes[key[: -len(".weight_packed")]] = (v["shape"][0], 2 * v["shape"][1])
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight_shape"):
                    out_features, in_features = (int(v) for v in fh.get_tensor(key).tolist())
                    shapes[key[: -len(".weight_shape")]] = (out_features, in_features)
    return shapes


def _scheme_for(module: str, schemes: list[dict]) -> dict:
    """The config group whose targets name ``module`` (exactly or by ``re:``), else the one
    targeting the class."""
    for s in schemes:
        for t in s["targets"] or []:
            if t == module or (t.startswith("re:") and re.match(t[3:], module)):
                return s
    return next((s for s in schemes if "Linear" in (s["targets"] or [])), {})


def describe_modules(names: list[str]) -> list[str]:
    """Module names folded by layer index, for reading: ["model.layers.0.mlp.down_proj",
    "model.layers.1.mlp.down_proj", "lm_head"] -> ["mlp.down_proj: layers 0-1", "lm_head"].
    Leaves with the same set of layers share a line."""
    layers: dict[str, set[int]] = {}
    others = []
    for name in names:
        m = re.match(r"(?:.*\.)?(?:layers|h|blocks)\.(\d+)\.(.+)$", name)
        if m:
            layers.setdefault(m.group(2), set()).add(int(m.group(1)))
        else:
            others.append(name)
    by_set: dict[tuple[int, ...], list[str]] = {}
    for leaf, idx in layers.items():
        by_set.setdefault(tuple(sorted(idx)), []).append(leaf)
    lines = [f"{', '.join(sorted(leaves))}: layer{'s' if len(idx) > 1 else ''} {_ranges(idx)}"
             for idx, leaves in sorted(by_set.items())]
    return lines + sorted(others)


def _ranges(idx: tuple[int, ...]) -> str:
    """(0, 1, 2, 5, 7, 8) -> "0-2, 5, 7-8"."""
    out, start = [], idx[0]
    for prev, cur in zip(idx, idx[1:] + (None,)):
        if cur != prev + 1:
            out.append(str(start) if start == prev else f"{start}-{prev}")
            start = cur
    return ", ".join(out)


def _width(dtype: str) -> int:
    return {"F32": 4, "F16": 2, "BF16": 2, "I32": 4, "I64": 8, "U8": 1, "I8": 1, "F8_E4M3": 1}.get(dtype, 4)


def format_inspection(info: dict) -> str:
    lines = [f"{info['path']}",
             f"  model      {info['model_type']} {info['architectures']}",
             f"  format     {info['format']}  (dtype {info['dtype']})",
             f"  size       {info['weights_bytes'] / 2**20:.1f} MiB weights, {info['disk_bytes'] / 2**20:.1f} MiB on disk"
             f" in {len(info['files'])} file(s), {info['tensors']} tensors",
             f"  parameters {info['parameters']:,} ({info['quantized_parameters']:,} quantized in "
             f"{info['quantized_modules']} modules)"]
    mixed = len(info["schemes"]) > 1
    for s in info["schemes"]:
        if s["format"] in ("float-quantized", "int-quantized"):
            what = (f"{s['format']}: {s['type']}{s['bits']} weights per {s['strategy']}, "
                    f"activations {s['activations']} (W8A8), observer={s['observer']}")
        elif s["type"] == "float":
            acts = f", activations {s['activations']} (W4A4)" if s["activations"] else ", 16-bit activations"
            what = (f"{s['format']}: float4 e2m1, block {s['group_size']}, "
                    f"{(s['scale_dtype'] or '').removeprefix('torch.')} scales{acts}")
        else:
            group = "per channel" if s["strategy"] == "channel" else f"group {s['group_size']}"
            kind = "symmetric" if s["symmetric"] else "asymmetric"
            what = f"{s['type']}{s['bits']} {group} {kind}, actorder={s['actorder']}, observer={s['observer']}"
        if not mixed:
            lines.append(f"  scheme     {what}, targets={s['targets']}")
            continue
        # Several formats: how much of the model each holds, and where (folded by layer).
        share = s["parameters"] / info["quantized_parameters"] if info["quantized_parameters"] else 0
        bits = f", {s['bits_per_weight']:.2f} bits/weight" if s["bits_per_weight"] else ""
        lines.append(f"  scheme     {what}: {s['modules']} module{'' if s['modules'] == 1 else 's'}, "
                     f"{share:.1%} of quantized weights{bits}")
        lines += [f"               {line}" for line in describe_modules(s["module_names"])]
    if info["bits_per_quantized_weight"]:
        lines.append(f"  bits       {info['bits_per_quantized_weight']:.3f} per quantized weight (codes + scales"
                     f" + zero points)")
    sp = info.get("sparsity")
    if sp:
        lines.append(f"  sparsity   {sp['pattern']} in {sp['modules']} modules, {sp['format']} v{sp['version']} "
                     f"({'/'.join(sp['values'])} values + 2-bit positions: {sp['bits_per_weight']:.3f} bits per "
                     f"dense weight; compress runtime only)")
    ad = info.get("adapter")
    if ad:
        lines.append(f"  low-rank adapter: {ad['modules']} modules, rank {ad['rank']}, alpha {ad['alpha']:g}, "
                     f"{ad['bytes'] / 2**20:.2f} MiB ({ad['parameters']:,} parameters; PEFT LoRA in {ad['path']}/)")
    if info["ignore"]:
        lines.append(f"  dense      {'; '.join(describe_modules(info['ignore']))}")
    kv = info.get("kv_cache")
    if kv:
        served = " (k_scale/v_scale + kv_cache_scheme for vLLM)" if info.get("kv_cache_scheme") else \
            " (compress runtime only)"
        lines.append(f"  kv cache   {KVCacheConfig.from_dict(dict(kv)).describe()}{served}")
    elif info.get("kv_cache_scheme"):
        lines.append(f"  kv cache   fp8 {info['kv_cache_scheme'].get('strategy')} scales (kv_cache_scheme)")
    if info["partial_group_modules"]:
        lines.append(f"  note       {info['partial_group_modules']} modules end in a partial group: loads in "
                     f"compress; compressed-tensors/transformers refuse it")
    return "\n".join(lines)
