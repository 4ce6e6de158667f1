"""The Triton quantized-matmul kernels against the float64 reference: every config, the edge shapes."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CUDA, REL_TOL, make_case, rel_err, triton_device  # noqa: F401  (fixture)

from compress.kernels import tuning
from compress.kernels.tuning import KernelConfig
from compress.kernels.dequant_linear import dequant_linear, dequant_weight

CONFIGS = tuning.all_configs()


def _batch(cfg: tuning.KernelConfig) -> int:
    """A batch that exercises the config: one row, a partial M tile, or several M tiles."""
    if cfg.kind == "splitk":
        return 1 if cfg.block_m == 1 else 5
    return 2 * cfg.block_m + 3 if cfg.kind == "tiled" else 7


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_matches_the_reference(cfg, triton_device):
    # N and K are not multiples of any tile; K = 200 leaves a partial last group of 8 columns.
    dtype = torch.float16
    case = make_case(72, 200, bits=4, group_size=64, symmetric=False, dtype=dtype, device=triton_device)
    x = torch.randn(_batch(cfg), 200).to(dtype).to(triton_device)
    y = dequant_linear(x, case.packed, case.scale, case.zero_point, case.bias, backend="triton", config=cfg,
                       **case.meta)
    assert y.shape == (x.shape[0], 72) and y.dtype == dtype
    assert rel_err(y, case.reference(x)) < REL_TOL[dtype]


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_k,split_k", [(64, 1), (128, 1), (128, 2)])
def test_one_token_tiles_of_whole_groups(block_k, split_k, symmetric, triton_device):
    """GROUP_MODE 3: a one-token tile of 2 or 4 groups of 32, scaled once per group. K = 200 (7
    groups, the last of 8 columns) puts the last tile's sub-tiles past K: they add nothing."""
    from compress.kernels.dequant_linear_triton import _group_mode
    assert _group_mode(32, None, block_k) == 3
    cfg = KernelConfig("splitk", 1, 32, block_k, split_k, 1, 4, 3)
    case = make_case(40, 200, bits=4, group_size=32, symmetric=symmetric, dtype=torch.float32,
                     device=triton_device)
    x = torch.randn(1, 200).to(triton_device)
    y = dequant_linear(x, case.packed, case.scale, case.zero_point, case.bias, backend="triton", config=cfg,
                       **case.meta)
    assert rel_err(y, case.reference(x)) < REL_TOL[torch.float32]


# (M, N, K, bits, group_size, symmetric, g_idx, dtype): M = 1 and odd sizes everywhere.
SHAPES = [
    (1, 40, 72, 4, 32, True, False, torch.float16),       # M = 1, partial last group (72 = 2*32 + 8)
    (1, 33, 64, 8, None, True, False, torch.float32),     # int8 per channel, N not a tile multiple
    (3, 40, 96, 4, 32, False, False, torch.bfloat16),     # asymmetric, bf16
    (16, 24, 130, 8, 64, False, False, torch.float16),    # int8 asymmetric, partial group of 2
    (9, 40, 96, 4, 16, True, False, torch.float32),       # groups narrower than every tile
    (5, 40, 100, 4, 32, False, True, torch.float16),      # dynamic act-order: g_idx gather
    (1, 40, 100, 4, 32, True, True, torch.float32),       # g_idx at M = 1
    (40, 56, 96, 2, 32, False, False, torch.float32),     # int2, a medium batch
    (300, 24, 64, 4, 32, True, False, torch.float16),     # large batch: dequantize + GEMM
]


@pytest.mark.parametrize("m,n,k,bits,group_size,symmetric,g_idx,dtype", SHAPES)
def test_shapes_with_the_chosen_config(m, n, k, bits, group_size, symmetric, g_idx, dtype, triton_device):
    case = make_case(n, k, bits=bits, group_size=group_size, symmetric=symmetric, g_idx=g_idx, dtype=dtype,
                     device=triton_device, seed=m)
    x = torch.randn(2, m, k).to(dtype).to(triton_device)         # leading dims are flattened
    y = dequant_linear(x, case.packed, case.scale, case.zero_point, case.bias, g_idx=case.g_idx,
                       backend="triton", **case.meta)
    assert y.shape == (2, m, n)
    assert rel_err(y, case.reference(x)) < REL_TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="real layer shapes run on the GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)])
def test_real_llama3_8b_shapes(m, n, k, triton_device):
    case = make_case(n, k, bits=4, group_size=128, symmetric=True, bias=False, dtype=torch.bfloat16,
                     device=triton_device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=triton_device)
    y = dequant_linear(x, case.packed, case.scale, None, None, backend="triton", **case.meta)
    assert rel_err(y, case.reference(x)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("k", [256, 200])
def test_one_token_per_word_path(bits, symmetric, k, triton_device):
    """M = 1 with K tiles inside one group (the decode GEMV: per-word sums, codes decoded in place in
    the mantissa of 2^23): every code position of a word, zero points, full tiles (K = 256, no
    column masks) and a partial last tile and group (K = 200)."""
    case = make_case(40, k, bits=bits, group_size=64, symmetric=symmetric, dtype=torch.float32,
                     device=triton_device, seed=bits)
    x = torch.randn(1, k, device=triton_device)
    for cfg in (tuning.KernelConfig("splitk", 1, 32, 64, 2), tuning.KernelConfig("splitk", 1, 64, 64, 1)):
        y = dequant_linear(x, case.packed, case.scale, case.zero_point, case.bias, backend="triton", config=cfg,
                           **case.meta)
        assert rel_err(y, case.reference(x)) < REL_TOL[torch.float32], cfg.name


def test_an_all_zero_group_contributes_nothing(triton_device):
    """Group 0 of every row holds codes equal to its zero point (an all-zero weight group): whatever
    the activations in its columns, the output must not change, not even by rounding."""
    case = make_case(40, 96, bits=4, group_size=32, symmetric=True, bias=False, dtype=torch.float32,
                     device=triton_device)
    case.codes[:, :32] = 0
    from compress.kernels.packing import pack_int32
    case.packed = pack_int32(case.codes, 4).to(triton_device)
    x = torch.randn(3, 96, device=triton_device)
    x2 = x.clone()
    x2[:, :32] = torch.randn(3, 32, device=triton_device) * 100
    for cfg in (tuning.KernelConfig("splitk", 1, 32, 32, 2), tuning.KernelConfig("splitk", 16, 32, 32, 1),
                tuning.KernelConfig("tiled", 16, 32, 64, 1)):
        rows = 1 if cfg.block_m == 1 else 3
        y = dequant_linear(x[:rows], case.packed, case.scale, None, None, backend="triton", config=cfg, **case.meta)
        y2 = dequant_linear(x2[:rows], case.packed, case.scale, None, None, backend="triton", config=cfg,
                            **case.meta)
        assert torch.equal(y, y2), cfg.name       # exact zeros: no cancellation of large terms
        assert rel_err(y, case.reference(x[:rows])) < REL_TOL[torch.float32]


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.kind != "dense" and c.split_k == 1][:4],
                         ids=lambda c: c.name)
def test_every_output_element_is_written(cfg, triton_device):
    from compress.kernels import dequant_linear_triton as tk
    case = make_case(72, 200, bits=4, group_size=64, dtype=torch.float32, device=triton_device)
    m = _batch(cfg)
    x = torch.randn(m, 200, device=triton_device)
    out = torch.full((m, 72), float("nan"), device=triton_device)
    tk.dequant_matmul(x, case.packed, case.scale, case.zero_point, None, case.bias, config=cfg, out=out,
                      **case.meta)
    assert rel_err(out, case.reference(x)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("bits,group_size,symmetric,g_idx", [(4, 32, False, False), (8, None, True, False),
                                                            (4, 64, True, True), (2, 16, False, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_kernel_is_bit_exact(bits, group_size, symmetric, g_idx, dtype, triton_device):
    from compress.kernels import dequant_linear_triton as tk
    case = make_case(40, 200, bits=bits, group_size=group_size, symmetric=symmetric, g_idx=g_idx,
                     dtype=torch.float32, device=triton_device)
    w = tk.dequant_weight(case.packed, case.scale, case.zero_point, case.g_idx, dtype=dtype, **case.meta)
    ref = dequant_weight(case.packed, case.scale, case.zero_point, bits, group_size, 200, dtype, case.g_idx)
    if dtype == torch.bfloat16 and not CUDA:
        # Triton 3.9's interpreter rounds float32 -> bf16 toward zero (the GPU rounds to nearest
        # even): allow one bf16 step there, exact everywhere else.
        assert torch.all((w.float() - ref.float()).abs() <= ref.float().abs() * 2.0 ** -7)
    else:
        assert torch.equal(w, ref)


def test_empty_batch(triton_device):
    case = make_case(40, 64, device=triton_device)
    y = dequant_linear(torch.zeros(0, 64, dtype=torch.float16, device=triton_device), case.packed, case.scale,
                       case.zero_point, case.bias, backend="triton", **case.meta)
    assert y.shape == (0, 40)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_quantized_model_gives_the_same_logits_on_the_triton_backend(arch, triton_device):
    import compress
    from conftest import tiny_model
    model = tiny_model(arch)
    compress.quantize(model, compress.RTNConfig(bits=4, group_size=32, symmetric=arch == "llama"), progress=False)
    model.to(triton_device)
    ids = torch.randint(0, 300, (2, 9), device=triton_device)
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert compress.set_backend(model, "triton") == (14 if arch == "llama" else 12)
        out = model(input_ids=ids).logits
        one = model(input_ids=ids[:1, :1]).logits                       # M = 1 through every layer
    assert rel_err(out, ref) < 1e-5
    assert rel_err(one, ref[:1, :1]) < 1e-5
