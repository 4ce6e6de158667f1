"""What a checkpoint holds, read from its config and safetensors headers (no tensor data)."""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from ..errors import CheckpointError, MissingPathError
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
    params = 0
    for key, v in tensors.items():
        if key.endswith((".weight_scale", ".weight_zero_point", ".weight_shape", ".weight_packed",
                         ".weight_global_scale", ".input_global_scale", ".weight_g_idx", ".k_scale", ".v_scale",
                         ".weight_values", ".weight_meta")):
            continue
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
            "activations": f"{a.get('type')}{a.get('num_bits')} dynamic={a.get('dynamic')}" if a else None})
    shapes = _weight_shapes(files, tensors)
    for module in packed:
        out_features, in_features = shapes[module]
        quant_params += out_features * in_features
        scheme = _scheme_for(module, info["schemes"])
        if scheme.get("group_size") and in_features % scheme["group_size"]:
            partial += 1
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
        8 * sum(math.prod(tensors[f"{m}.{s}"]["shape"]) * _width(tensors[f"{m}.{s}"]["dtype"])
                for m in packed for s in ("weight_packed", "weight_scale", "weight_zero_point")
                if f"{m}.{s}" in tensors) / quant_params if quant_params else None)
    return info


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
    for s in schemes:
        if module in (s["targets"] or []):
            return s
    return next((s for s in schemes if "Linear" in (s["targets"] or [])), {})


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
    for s in info["schemes"]:
        if s["type"] == "float":
            acts = f", activations {s['activations']} (W4A4)" if s["activations"] else ", 16-bit activations"
            lines.append(f"  scheme     {s['format']}: float4 e2m1, block {s['group_size']}, "
                         f"{(s['scale_dtype'] or '').removeprefix('torch.')} scales{acts}, targets={s['targets']}")
            continue
        group = "per channel" if s["strategy"] == "channel" else f"group {s['group_size']}"
        kind = "symmetric" if s["symmetric"] else "asymmetric"
        lines.append(f"  scheme     {s['type']}{s['bits']} {group} {kind}, actorder={s['actorder']}, "
                     f"observer={s['observer']}, targets={s['targets']}")
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
        lines.append(f"  dense      {', '.join(info['ignore'])}")
    kv = info.get("kv_cache")
    if kv:
        from ..quant.kv_config import KVCacheConfig
        served = " (k_scale/v_scale + kv_cache_scheme for vLLM)" if info.get("kv_cache_scheme") else \
            " (compress runtime only)"
        lines.append(f"  kv cache   {KVCacheConfig.from_dict(dict(kv)).describe()}{served}")
    elif info.get("kv_cache_scheme"):
        lines.append(f"  kv cache   fp8 {info['kv_cache_scheme'].get('strategy')} scales (kv_cache_scheme)")
    if info["partial_group_modules"]:
        lines.append(f"  note       {info['partial_group_modules']} modules end in a partial group: loads in "
                     f"compress; compressed-tensors/transformers refuse it")
    return "\n".join(lines)
