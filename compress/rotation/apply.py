"""The rotation pass: R1 (residual stream), R2 (per head, v -> o) and R4 (down_proj input, online).

Row-vector convention, as ``nn.Linear`` computes it: ``y = x W^T + b``, W (out, in). For an
orthogonal Q (Q Q^T = I):

- a linear that *reads* the rotated stream ``h Q`` computes the same ``y`` with ``W Q``;
- a linear that *writes* it must produce ``y Q``: ``Q^T W`` and ``b Q``;
- a RMSNorm without its scale commutes with Q (``||h Q|| = ||h||``), so each norm's scale is first
  folded into the columns of the linears it feeds (``W diag(w)``) and set to 1; the embedding
  table becomes ``E Q`` and the head ``W_lm diag(w_final) Q``.

R2 multiplies v_proj's rows of each KV head by a Hadamard H of head_dim and o_proj's columns of
each attention head by the same H (attention mixes tokens, not channels, so ``softmax(.) (v H) =
(softmax(.) v) H``). R4 multiplies down_proj's columns by H of the MLP width offline and rotates
down_proj's input online (``compress/transforms.py``). Everything is computed in float64 and stored back in
the weights' dtype; ``records["check"]`` is the largest change of the logits on a short sequence.
Registered as "rotate" (area "quantize", no calibration data).
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn

from ..configs import register_method
from ..engine import Records
from ..errors import ConfigError
from ..kernels.hadamard import decompose, hadamard, hadamard_matrix
from ..modeling import find_decoder_layers, get_module
from .config import RotationConfig
from ..transforms import attach_input_transform

log = logging.getLogger(__name__)

# Families whose decoder layer is pre-norm RMSNorm -> attention (q/k/v/o) -> residual, RMSNorm ->
# gated MLP (gate/up/down) -> residual, with the norm's scale multiplying (not 1 + w).
LAYOUT = {"norms": ("input_layernorm", "post_attention_layernorm"),
          "attn_in": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"), "attn_out": "self_attn.o_proj",
          "mlp_in": ("mlp.gate_proj", "mlp.up_proj"), "mlp_out": "mlp.down_proj", "v": "self_attn.v_proj"}
FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
# Largest change of the logits (relative to their max |value|) the rotation may cause, by the dtype
# of the weights; beyond it something does not commute and the pass refuses. (float64 models still
# round to float32 inside transformers' RMSNorm: 1e-7 is their floor.)
CHECK_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
CHECK_TOLERANCE_16BIT = 5e-2


def _family(model: nn.Module) -> str:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in FAMILIES:
        raise ConfigError(
            f"rotate: model type {model_type!r} is not supported; it supports {list(FAMILIES)} (pre-norm RMSNorm "
            f"decoders with separate q/k/v/o and gate/up/down). Families with LayerNorm (mean subtraction does not "
            f"commute with a rotation), norms after the attention/MLP (Gemma 2/3, OLMo 2), fused projections or "
            f"mixture-of-experts MLPs are not rotated yet: leave the rotation out of the recipe")
    return model_type


def orthogonal(n: int, kind: str, seed: int, device=None, block: int | None = None) -> torch.Tensor:
    """The (n, n) float64 orthogonal matrix of a residual rotation ``kind``; with ``block``, the
    block-diagonal matrix of n / block such rotations (each its own random signs / matrix)."""
    if block is not None:
        blocks = [orthogonal(block, kind, seed * 100003 + i) for i in range(n // block)]
        return torch.block_diag(*blocks).to(device)
    gen = torch.Generator().manual_seed(seed)
    if kind == "random":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))).to(device)          # Haar-distributed
    try:
        h = hadamard_matrix(n, dtype=torch.float64)
    except ValueError as exc:
        raise ConfigError(f"rotate: no Hadamard matrix of order {n} ({exc}); use residual: random") from exc
    if kind == "random-hadamard":
        signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
        h = h * signs[None, :]                                          # H diag(s)
    return h.to(device)


def _right(linear: nn.Module, m: torch.Tensor, col_scale: torch.Tensor | None = None) -> None:
    """W <- W diag(col_scale) m (the linear reads rotated inputs)."""
    w = linear.weight.data.double()
    if col_scale is not None:
        w = w * col_scale.double()[None, :]
    linear.weight.data = (w @ m.to(w.device)).to(linear.weight.dtype)


def _left(linear: nn.Module, m: torch.Tensor) -> None:
    """W <- m^T W, b <- b m (the linear writes the rotated stream)."""
    m = m.to(linear.weight.device)
    linear.weight.data = (m.T @ linear.weight.data.double()).to(linear.weight.dtype)
    if getattr(linear, "bias", None) is not None:
        linear.bias.data = (linear.bias.data.double() @ m).to(linear.bias.dtype)


def _input_hadamard(linear: nn.Module, block: int | None) -> None:
    """W <- W H (H of in_features, block-diagonal with ``block``-sized blocks, or full), so that
    ``(x H) (W H)^T = x W^T``; then rotate the input online."""
    n = linear.in_features
    if block is not None:
        if n % block:
            raise ConfigError(f"rotate: down_proj_block {block} does not divide down_proj's {n} input features; "
                              f"pick a power of two that does (e.g. {n & -n}), or null for one Hadamard of {n}")
        w = linear.weight.data.double()
        h = hadamard(block, w.device, torch.float64)
        linear.weight.data = (w.reshape(w.shape[0], n // block, block) @ h).reshape(w.shape).to(linear.weight.dtype)
    else:
        try:
            _right(linear, hadamard_matrix(n, dtype=torch.float64))
        except ValueError as exc:
            raise ConfigError(f"rotate: down_proj has {n} input features and no Hadamard matrix of that order "
                              f"exists here ({exc}); set down_proj_block to a power of two dividing {n}") from exc
    attach_input_transform(linear, "hadamard", block)


def _untie(model: nn.Module) -> bool:
    """Give the head its own weight if it shares the embedding's. Returns whether it did."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight.data_ptr() != embed.weight.data_ptr():
        return False
    head.weight = nn.Parameter(embed.weight.detach().clone(), requires_grad=embed.weight.requires_grad)
    model.config.tie_word_embeddings = False
    if hasattr(model.config, "get_text_config"):
        model.config.get_text_config().tie_word_embeddings = False
    return True


def _final_norm(model: nn.Module, layers_name: str) -> nn.Module:
    parent = get_module(model, layers_name.rpartition(".")[0])
    norm = getattr(parent, "norm", None)
    if norm is None:
        raise ConfigError(f"rotate: no final norm found beside {layers_name} (expected {layers_name.rpartition('.')[0]}"
                          f".norm)")
    return norm


def _check_norm(norm: nn.Module, where: str) -> torch.Tensor:
    if getattr(norm, "bias", None) is not None or not hasattr(norm, "weight") or "RMSNorm" not in type(norm).__name__:
        raise ConfigError(f"rotate: {where} is a {type(norm).__name__}, not a RMSNorm without bias: the rotation "
                          f"would not commute with it")
    return norm.weight.data


def _head_dim(config) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def _check(model: nn.Module, cfg: RotationConfig, layers_name: str, layers) -> None:
    """Everything that could refuse, before any weight moves (a refusal leaves the model as it was)."""
    config = model.config
    if cfg.residual_block is not None and int(config.hidden_size) % cfg.residual_block:
        raise ConfigError(f"rotate: residual_block {cfg.residual_block} does not divide the hidden size "
                          f"{config.hidden_size}")
    if cfg.residual in ("hadamard", "random-hadamard") and cfg.residual_block is None \
            and decompose(int(config.hidden_size)) is None:
        raise ConfigError(f"rotate: no Hadamard matrix of the hidden size {config.hidden_size} is built here "
                          f"(orders 2^a * m, m from a Paley construction); use residual: random")
    if cfg.residual is not None:
        for i, layer in enumerate(layers):
            for norm_name in LAYOUT["norms"]:
                _check_norm(get_module(layer, norm_name), f"{layers_name}.{i}.{norm_name}")
        _check_norm(_final_norm(model, layers_name), "the final norm")
    hd = _head_dim(config)
    if cfg.heads and hd & (hd - 1):
        raise ConfigError(f"rotate: heads needs a power-of-two head_dim, this model has {hd}; set heads: false")
    if cfg.down_proj:
        n = get_module(layers[0], LAYOUT["mlp_out"]).in_features
        block = cfg.down_proj_block
        if block is not None and n % block:
            raise ConfigError(f"rotate: down_proj_block {block} does not divide down_proj's {n} input features; "
                              f"pick a power of two that does (e.g. {n & -n}), or null for one Hadamard of {n}")
        if block is None and decompose(n) is None:
            raise ConfigError(f"rotate: down_proj has {n} input features and no Hadamard matrix of that order is "
                              f"built here; set down_proj_block to a power of two dividing {n}")


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def rotate(model: nn.Module, cfg: RotationConfig, calib=None, *, device=None, batch_size: int | None = None,
           progress: bool = True) -> Records:
    """Rotate ``model`` in place (``cfg``); ``calib`` is not used. Refuses families where a rotation
    would not leave the float model's function unchanged."""
    _family(model)
    start = time.perf_counter()
    config = model.config
    layers_name, layers = find_decoder_layers(model)
    _check(model, cfg, layers_name, layers)
    dev = next(model.parameters()).device
    ids = torch.randint(0, int(config.vocab_size), (1, 8), generator=torch.Generator().manual_seed(cfg.seed)).to(dev)
    before = _logits(model, ids)
    summary: dict = {"residual": cfg.residual, "heads": cfg.heads, "down_proj": cfg.down_proj, "untied": False}

    if cfg.residual is not None:
        q = orthogonal(int(config.hidden_size), cfg.residual, cfg.seed, block=cfg.residual_block)
        summary["untied"] = _untie(model)
        embed, head = model.get_input_embeddings(), model.get_output_embeddings()
        embed.weight.data = (embed.weight.data.double() @ q.to(embed.weight.device)).to(embed.weight.dtype)
        for i, layer in enumerate(layers):
            for norm_name, readers in ((LAYOUT["norms"][0], LAYOUT["attn_in"]), (LAYOUT["norms"][1], LAYOUT["mlp_in"])):
                norm = get_module(layer, norm_name)
                w = _check_norm(norm, f"{layers_name}.{i}.{norm_name}")
                for name in readers:
                    _right(get_module(layer, name), q, w)
                norm.weight.data.fill_(1.0)
            for name in (LAYOUT["attn_out"], LAYOUT["mlp_out"]):
                _left(get_module(layer, name), q)
        final = _final_norm(model, layers_name)
        _right(head, q, _check_norm(final, "the final norm"))
        final.weight.data.fill_(1.0)

    if cfg.heads:
        hd = _head_dim(config)
        if hd & (hd - 1):
            raise ConfigError(f"rotate: heads needs a power-of-two head_dim, this model has {hd}; set heads: false")
        h = hadamard_matrix(hd, dtype=torch.float64)
        for layer in layers:
            v, o = get_module(layer, LAYOUT["v"]), get_module(layer, LAYOUT["attn_out"])
            wv = v.weight.data.double()                                          # (kv_heads * hd, hidden)
            v.weight.data = (h.T @ wv.reshape(-1, hd, wv.shape[1])).reshape(wv.shape).to(v.weight.dtype)
            if v.bias is not None:
                v.bias.data = (v.bias.data.double().reshape(-1, hd) @ h).reshape(-1).to(v.bias.dtype)
            wo = o.weight.data.double()                                          # (hidden, heads * hd)
            o.weight.data = (wo.reshape(wo.shape[0], -1, hd) @ h).reshape(wo.shape).to(o.weight.dtype)

    if cfg.down_proj:
        for layer in layers:
            _input_hadamard(get_module(layer, LAYOUT["mlp_out"]), cfg.down_proj_block)

    after = _logits(model, ids)
    change = ((after - before).abs().max() / before.abs().max().clamp_min(1e-12)).item()
    dtype = model.get_input_embeddings().weight.dtype
    tol = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE_16BIT)
    summary["check"] = {"max_logit_change": change, "tolerance": tol}
    if not change <= tol:
        raise ConfigError(f"rotate: the rotated model's logits moved by {change:.3g} (relative to their largest, "
                          f"tolerance {tol:.1g} in {dtype}): a module of this model does not commute with the rotation; "
                          f"the model is left rotated, reload it")
    log.info("rotate: %s%s%s in %.1f s (logits moved %.2g%s)", f"R1 {cfg.residual}" if cfg.residual else "",
             ", R2 heads" if cfg.heads else "", ", R4 down_proj (online)" if cfg.down_proj else "",
             time.perf_counter() - start, change, "; lm_head untied" if summary["untied"] else "")
    return Records({}, {"rotation": summary})


register_method(RotationConfig, rotate, area="quantize", needs_data=False)

__all__ = ["rotate", "orthogonal", "FAMILIES"]
