"""The W8A8 linear: the Triton GEMM against the reference (every config, the edge shapes, FP8 and
INT8, token / group / tensor activations with channel / tensor / 128x128 block weights), the
torch._scaled_mm and torch._int_mm paths' scale layouts (both run on the CPU too), the dispatch
rules, and refusals."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CUDA, rel_err, triton_device  # noqa: F401  (fixture)

from compress.kernels.act_quant import quantize_activations_reference
from compress.kernels.w8a8_linear import (_int_mm, _scaled_mm, expand_block_scale, native_plan, w8a8_dequant_weight,
                                          w8a8_linear, w8a8_linear_reference)

# ||y - ref|| / ||ref|| per output dtype: the codes are the reference's exactly and each product of
# two 8-bit codes is exact, so only float32 summation order (and the final rounding) differs.
W8A8_TOL = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}
# (kind, act, block, weight scale): the five schemes, and the mixed combinations the kernel allows.
SCHEMES = [("fp8", "token", None, "channel"), ("fp8", "group", 128, "block"), ("fp8", "tensor", None, "tensor"),
           ("int8", "token", None, "channel"), ("int8", "tensor", None, "channel"),
           ("fp8", "token", None, "tensor"), ("int8", "group", 64, "block")]
SHAPES = [(1, 40, 200), (20, 72, 576), (3, 130, 256)]        # M = 1; N, K multiples of no tile; partial blocks


def make_weight(kind: str, n: int, k: int, block: int | None, scale: str, dtype=torch.bfloat16, seed: int = 0):
    """Codes of a real layer's size and their scales (model dtype) from RTN of N(0, 0.02) weights,
    with an all-zero output row (and, for blocks, an all-zero block)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.02 * (1 + torch.arange(n).float()[:, None] / n)
    w[1] = 0.0
    qmax = 448.0 if kind == "fp8" else 127.0
    if scale == "block":
        if n > block and k > block:
            w[:block, :block] = 0.0                                                # an all-zero block
        nb, kb = -(-n // block), -(-k // block)
        amax = torch.nn.functional.pad(w.abs(), (0, kb * block - k, 0, nb * block - n)).view(nb, block, kb, block)
        s = amax.amax(dim=(1, 3)) / qmax
    elif scale == "channel":
        s = w.abs().amax(dim=1, keepdim=True) / qmax
    else:
        s = w.abs().amax().reshape(1) / qmax
    s = s.clamp_min(1e-8).to(dtype)
    full = expand_block_scale(s, (n, k), block) if scale == "block" else s.float().reshape(-1, 1)
    y = w / full
    codes = y.clamp(-qmax, qmax).to(torch.float8_e4m3fn) if kind == "fp8" else y.round().clamp(-127, 127).to(torch.int8)
    return codes, s


def _args(kind, act, block, scale, m, n, k, dtype, device, seed=0):
    codes, s = make_weight(kind, n, k, block, scale, seed=seed)
    gen = torch.Generator().manual_seed(seed + 1)
    x = (torch.randn(m, k, generator=gen) * (1 + torch.rand(1, k, generator=gen) * 4)).to(dtype)
    input_scale = torch.tensor([x.float().abs().max().item() / (448.0 if kind == "fp8" else 127.0)]).to(dtype) \
        if act == "tensor" else None
    bias = torch.randn(n, generator=gen).to(dtype)
    put = (lambda t: None if t is None else t.to(device))
    return put(x), put(codes), put(s), put(input_scale), put(bias)


def _group(act, block):
    return block if act == "group" else 128


@pytest.mark.parametrize("kind,act,block,scale", SCHEMES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_triton_gemm_every_config(kind, act, block, scale, m, n, k, triton_device):
    from compress.kernels import w8a8_linear_triton as tk
    x, w, s, ins, b = _args(kind, act, block, scale, m, n, k, torch.float32, triton_device)
    ref = w8a8_linear_reference(x.cpu(), w.cpu(), s.cpu(), None if ins is None else ins.cpu(), b.cpu(), kind=kind,
                                act=act, block=block, group_size=_group(act, block))
    xq, sa = quantize_activations_reference(x, kind, act, group_size=_group(act, block), static_scale=ins)
    limit = tk.tile_k_limit(act, _group(act, block), block)
    for cfg in (c for c in tk.w8a8_configs() if c.block_k <= limit):
        out = torch.full((m, n), float("nan"), device=triton_device)            # every element written
        y = tk.w8a8_matmul(xq, sa, w, s, b, kind=kind, act=act, block=block, group_size=_group(act, block),
                           out_dtype=torch.float32, config=cfg, out=out)
        assert rel_err(y.cpu(), ref) < W8A8_TOL[torch.float32], cfg.name


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind,act,block,scale", SCHEMES[:5])
def test_dispatch_triton_matches_reference(kind, act, block, scale, dtype, triton_device):
    x, w, s, ins, b = _args(kind, act, block, scale, 2, 72, 576, dtype, triton_device)
    x3 = x.reshape(2, 1, 576)                                                     # leading dims kept
    y = w8a8_linear(x3, w, s, ins, b, kind=kind, act=act, block=block, group_size=_group(act, block),
                    backend="triton")
    ref = w8a8_linear_reference(x.cpu(), w.cpu(), s.cpu(), None if ins is None else ins.cpu(), b.cpu(), kind=kind,
                                act=act, block=block, group_size=_group(act, block))
    assert y.shape == (2, 1, 72) and y.dtype == dtype
    assert rel_err(y.reshape(2, 72).cpu(), ref) < W8A8_TOL[dtype]


def test_zero_weight_rows_and_blocks_give_the_bias_exactly(triton_device):
    """An all-zero output row adds exact zeros whatever the activations (and their block)."""
    from compress.kernels import w8a8_linear_triton as tk
    x, w, s, _, b = _args("fp8", "group", 128, "block", 20, 200, 300, torch.float32, triton_device)
    xq, sa = quantize_activations_reference(x, "fp8", "group")
    y = tk.w8a8_matmul(xq, sa, w, s, b, kind="fp8", act="group", block=128, group_size=128, out_dtype=torch.float32)
    assert torch.equal(y[:, 1], b[1].expand(20))                                 # zero row 1
    assert not torch.equal(y[:, 2], b[2].expand(20))


def test_scales_are_applied_per_block(triton_device):
    """Negative control: doubling one weight block's scale changes exactly that block's outputs,
    and the kernel still follows the reference reading the same scales."""
    from compress.kernels import w8a8_linear_triton as tk
    x, w, s, _, b = _args("fp8", "group", 128, "block", 3, 200, 300, torch.float32, triton_device, seed=4)
    xq, sa = quantize_activations_reference(x, "fp8", "group")
    run = (lambda scale: tk.w8a8_matmul(xq, sa, w, scale, b, kind="fp8", act="group", block=128, group_size=128,
                                        out_dtype=torch.float32).cpu())
    s2 = s.clone()
    s2[1, 2] *= 2                                                                 # rows 128..199, columns 256..299
    y, y2 = run(s), run(s2)
    changed = (y != y2).any(dim=0)
    assert changed[128:].all() and not changed[:128].any()
    ref2 = w8a8_linear_reference(x.cpu(), w.cpu(), s2.cpu(), None, b.cpu(), kind="fp8", act="group", block=128)
    assert rel_err(y2, ref2) < W8A8_TOL[torch.float32] < rel_err(y, ref2)


@pytest.mark.parametrize("kind,act,scale", [("fp8", "token", "channel"), ("fp8", "tensor", "tensor"),
                                            ("fp8", "token", "tensor"), ("fp8", "tensor", "channel")])
def test_scaled_mm_scale_layouts(kind, act, scale):
    """The torch._scaled_mm call (row-wise (M, 1) x (1, N) or two scalars) on the CPU, where torch
    implements it too: the layouts the GPU path passes give the reference's numbers."""
    x, w, s, ins, b = _args(kind, act, None, scale, 5, 48, 64, torch.bfloat16, "cpu")
    xq, sa = quantize_activations_reference(x, kind, act, static_scale=ins)
    y = _scaled_mm(xq, sa, w, s, b, torch.bfloat16)
    ref = w8a8_linear_reference(x, w, s, ins, b, kind=kind, act=act)
    assert y.dtype == torch.bfloat16 and rel_err(y, ref) < W8A8_TOL[torch.bfloat16]


@pytest.mark.parametrize("act", ["token", "tensor"])
def test_int_mm_epilogue(act):
    x, w, s, ins, b = _args("int8", act, None, "channel", 24, 48, 64, torch.float16, "cpu")
    xq, sa = quantize_activations_reference(x, "int8", act, static_scale=ins)
    y = _int_mm(xq, sa, w, s, b, torch.float16)
    ref = w8a8_linear_reference(x, w, s, ins, b, kind="int8", act=act)
    assert y.dtype == torch.float16 and rel_err(y, ref) < W8A8_TOL[torch.float16]


def test_native_plan_rules():
    bf16, h100, ada, a100 = torch.bfloat16, (9, 0), (8, 9), (8, 0)
    assert native_plan("fp8", "token", None, 1, 4096, 4096, bf16, h100, False)[0] == "scaled_mm"
    assert native_plan("fp8", "token", None, 4096, 6144, 4096, bf16, ada, False)[0] == "scaled_mm"
    assert native_plan("fp8", "tensor", None, 8, 4096, 4096, torch.float16, h100, True)[0] == "scaled_mm"
    assert native_plan("fp8", "token", None, 8, 4096, 4096, torch.float16, h100, False)[0] == "triton"
    assert native_plan("fp8", "token", None, 8, 4096, 4104, bf16, h100, False)[0] == "triton"    # K % 16
    assert native_plan("fp8", "group", 128, 8, 4096, 4096, bf16, h100, False)[0] == "triton"
    assert native_plan("fp8", "token", None, 8, 4096, 4096, bf16, a100, False)[0] == "triton"
    assert native_plan("int8", "token", None, 17, 4096, 4096, bf16, a100, False)[0] == "int_mm"
    assert native_plan("int8", "token", None, 16, 4096, 4096, bf16, a100, False)[0] == "triton"   # M <= 16
    assert native_plan("int8", "tensor", None, 64, 4096, 4100, bf16, a100, False)[0] == "triton"  # N % 8


def test_reference_and_refusals():
    x, w, s, ins, b = _args("fp8", "token", None, "channel", 4, 48, 64, torch.float32, "cpu")
    ref = w8a8_linear_reference(x, w, s, None, b, kind="fp8", act="token")
    assert torch.equal(w8a8_linear(x, w, s, None, b, kind="fp8", act="token", backend="torch"), ref)
    assert torch.equal(w8a8_linear(x, w, s, None, b, kind="fp8", act="token"), ref)       # auto on the CPU
    dense = torch.nn.functional.linear(x, w8a8_dequant_weight(w, s), b)
    assert 1e-4 < rel_err(ref, dense) < 0.05                      # activations really are rounded, and close
    with pytest.raises(ValueError, match="int8"):
        w8a8_linear(x, w, s, None, b, kind="int8", act="token")
    with pytest.raises(ValueError, match="input_scale"):
        w8a8_linear(x, w, s, None, b, kind="fp8", act="tensor")
    with pytest.raises(ValueError, match="block=128"):
        w8a8_linear(x, w, s, None, b, kind="fp8", act="group", block=128)
    with pytest.raises(ValueError, match="features"):
        w8a8_linear(x[:, :32], w, s, None, b, kind="fp8", act="token")


@pytest.mark.skipif(not CUDA, reason="real layer shapes run on the GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("m", [1, 16, 4096])
@pytest.mark.parametrize("kind,act,block,scale", SCHEMES[:5])
def test_real_llama3_8b_shapes(kind, act, block, scale, m):
    """``backend="auto"`` as a model runs it on the GPU (the fused activation quantization, then
    ``torch._scaled_mm`` / ``torch._int_mm`` / our GEMM as ``native_plan`` decides) at Llama-3-8B's
    o_proj shape, against the reference computed on the same GPU."""
    x, w, s, ins, b = _args(kind, act, block, scale, m, 4096, 4096, torch.bfloat16, "cuda")
    meta = dict(kind=kind, act=act, block=block, group_size=_group(act, block))
    y = w8a8_linear(x, w, s, ins, b, backend="auto", **meta)
    ref = w8a8_linear_reference(x, w, s, ins, b, **meta)
    assert y.shape == (m, 4096) and y.dtype == torch.bfloat16
    assert rel_err(y, ref) < W8A8_TOL[torch.bfloat16]
