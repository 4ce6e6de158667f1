"""The 2:4 compact layout (exact round trips, refusals), its reference, and the Triton kernel against a
float64 reference: every config, the edge shapes, an all-zero weight, a corrupted metadata nibble."""

from __future__ import annotations

import pytest
import torch
from kernel_cases import CUDA, REL_TOL, rel_err, triton_device  # noqa: F401  (fixture)

from compress.errors import ConfigError
from compress.kernels import sparse24_linear, sparse24_linear_reference, tuning
from compress.kernels.packing import pack_int32, unpack_int32
from compress.kernels.sparse24_linear import (check_meta, dequant_24_int4, kept_columns, pack_24, quantize_24,
                                              sparse24_weight, unpack_24)
from compress.pruning.sparse_linear import int4_scales, quantize_24_int4
from compress.quant.grid import dequantize, quantize

CONFIGS = tuning.all_configs()


def random_24(n: int, k: int, *, dtype=torch.float32, seed: int = 0, scale: float = 1.0) -> torch.Tensor:
    """A 2:4 sparse (n, k) weight with every kind of group: 2 nonzeros (most), 1, 0, and a whole
    zero row when n > 3."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=gen) * scale
    keep = torch.zeros(n, k // 4, 4, dtype=torch.bool)
    keep.scatter_(2, torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=2).indices, True)
    kind = torch.randint(0, 8, (n, k // 4, 1), generator=gen)
    keep &= ~(kind == 0)                                                       # all-zero groups
    one = (kind == 1) & (torch.arange(4) == torch.randint(0, 4, (n, k // 4, 1), generator=gen))
    keep = torch.where(kind == 1, one, keep)                                   # one-nonzero groups
    w = (w * keep).reshape(n, k)
    if n > 3:
        w[2] = 0
    return w.to(dtype)


def make(n: int, k: int, *, bits, group_size=None, dtype=torch.float16, bias=True, seed=0, device="cpu"):
    """(weight tensor the kernel reads, meta, scale, bias, dense float64 weight)."""
    w = random_24(n, k, dtype=dtype, seed=seed, scale=0.05)
    if bits is None:
        kept, meta = pack_24(w)
        scale = None
    else:
        kept, scale, meta = quantize_24_int4(w, group_size)
    dense = sparse24_weight(kept, meta, scale, in_features=k, group_size=group_size, bits=bits, dtype=torch.float64)
    b = torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype) if bias else None
    put = (lambda t: None if t is None else t.to(device))
    return put(kept), put(meta), put(scale), put(b), dense


def reference64(x: torch.Tensor, dense: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x.cpu().double(), dense, None if bias is None else bias.cpu().double())


# --------------------------------------------------------------------------- layout

@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n,k", [(1, 8), (7, 64), (33, 200)])
def test_pack_unpack_round_trip_is_exact(n, k, dtype):
    w = random_24(n, k, dtype=dtype, seed=n)
    values, meta = pack_24(w)
    assert values.shape == (n, k // 2) and values.dtype == dtype
    assert meta.shape == (n, k // 8) and meta.dtype == torch.uint8
    assert torch.equal(unpack_24(values, meta, k), w)
    assert check_meta(meta) is None
    cols = kept_columns(meta, k).reshape(n, k // 4, 2)
    assert bool((cols[..., 0] < cols[..., 1]).all())                          # increasing column order
    assert bool(((cols // 4) == torch.arange(k // 4)[:, None]).all())         # both inside their group
    # The nonzeros are the kept ones; zero-filled slots take the lowest free positions.
    assert torch.equal(w.gather(1, kept_columns(meta, k)), values)


def test_layout_by_hand():
    # group 0: nonzeros at 1 and 3; group 1: one nonzero at 2 (the lowest zero, 0, fills in);
    # group 2: all zero (positions 0, 1); group 3: nonzeros at 0 and 3.
    w = torch.tensor([[0, 5, 0, 7, 0, 0, 3, 0, 0, 0, 0, 0, -1, 0, 0, 2]], dtype=torch.float32)
    values, meta = pack_24(w)
    assert values.tolist() == [[5, 7, 0, 3, 0, 0, -1, 2]]
    # nibble = idx0 | idx1 << 2: (1, 3) = 0xD, (0, 2) = 0x8, (0, 1) = 0x4, (0, 3) = 0xC; low nibble first.
    assert meta.tolist() == [[0x8D, 0xC4]]
    assert kept_columns(meta, 16).tolist() == [[1, 3, 4, 6, 8, 9, 12, 15]]
    # int4: codes of the kept values packed as QuantLinear packs them (code k in bits 4k, stored q + 8).
    scale = torch.tensor([[1.0]])
    codes = quantize_24(values, meta, scale, None, 16)
    assert codes.tolist() == [[5, 7, 0, 3, 0, 0, -1, 2]]
    packed, _, _ = quantize_24_int4(w, None, scale=scale)
    word = sum((c + 8) << (4 * i) for i, c in enumerate(codes[0].tolist()))
    assert packed.tolist() == [[word - (1 << 32) if word >= 1 << 31 else word]]
    assert torch.equal(packed, pack_int32(codes, 4))


def test_pack_refuses_three_of_four_by_row_and_group():
    w = random_24(6, 32, seed=1)
    w[4, 20:24] = torch.tensor([1.0, 2.0, 0.0, 3.0])
    with pytest.raises(ConfigError, match=r"row 4, group 5 \(columns 20..23\) holds 3 nonzeros.*leave the layer dense"):
        pack_24(w)


@pytest.mark.parametrize("k", [4, 12, 100])
def test_in_features_not_a_multiple_of_8_is_refused(k):
    with pytest.raises(ConfigError, match=rf"\(3, {k}\).*multiple of 8.*leave this layer dense"):
        pack_24(torch.zeros(3, k))


@pytest.mark.parametrize("group_size", [12, 48, 0])
def test_bad_group_sizes_are_refused(group_size):
    with pytest.raises(ConfigError, match="multiple of 8 dividing in_features 64"):
        quantize_24_int4(random_24(4, 64), group_size)


@pytest.mark.parametrize("group_size", [64, 128, None, 8])
def test_int4_is_round_to_nearest_of_the_dense_weight(group_size):
    """The kept codes on the layout are exactly QuantLinear's RTN of the dense 2:4 weight (symmetric,
    amax / 7 per group of original columns): dropped entries are code 0 there."""
    w = random_24(12, 256, dtype=torch.bfloat16, seed=3)
    packed, scale, meta = quantize_24_int4(w, group_size)
    assert packed.shape == (12, 256 // 16) and packed.dtype == torch.int32
    assert scale.shape == (12, 1 if group_size is None else 256 // group_size) and scale.dtype == torch.bfloat16
    assert torch.equal(scale, int4_scales(w, group_size))
    dense_codes = quantize(w.float(), scale.float(), torch.zeros_like(scale, dtype=torch.float32), 4, group_size)
    expected = dequantize(dense_codes, scale, None, group_size, torch.bfloat16)
    assert torch.equal(dequant_24_int4(packed, scale, meta, 256, group_size, torch.bfloat16), expected)
    codes = unpack_int32(packed, 4, 128)
    assert torch.equal(codes, dense_codes.gather(1, kept_columns(meta, 256)))


def test_reference_is_linear_with_the_dense_weight():
    w = random_24(10, 64, seed=2)
    values, meta = pack_24(w)
    x, b = torch.randn(2, 3, 64), torch.randn(10)
    y = sparse24_linear_reference(x, values, meta, None, b, in_features=64, group_size=None, bits=None)
    assert torch.equal(y, torch.nn.functional.linear(x, w, b))
    for backend in ("auto", "torch"):                                       # the CPU runs the reference
        y2 = sparse24_linear(x, values, meta, None, b, in_features=64, group_size=None, bits=None, backend=backend)
        assert torch.equal(y2, y)


def test_unknown_backend_and_bit_width_are_refused():
    values, meta = pack_24(random_24(4, 16))
    with pytest.raises(ConfigError, match="backend"):
        sparse24_linear(torch.zeros(1, 16), values, meta, None, None, in_features=16, group_size=None, bits=None,
                        backend="cuda-magic")
    with pytest.raises(ConfigError, match="bits=8"):
        sparse24_linear(torch.zeros(1, 16), values, meta, None, None, in_features=16, group_size=None, bits=8)


# --------------------------------------------------------------------------- Triton

def _batch(cfg: tuning.KernelConfig) -> int:
    """A batch that exercises the config: one row, a partial M tile, or several M tiles."""
    if cfg.kind == "splitk":
        return 1 if cfg.block_m == 1 else 5
    return 2 * cfg.block_m + 3 if cfg.kind == "tiled" else 7


FLOAT_DTYPES = (torch.float16, torch.float32, torch.bfloat16)
INT4_GROUPS = (None, 88, 8)          # per channel (one scale per tile), a scale per lane, the smallest group


@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
@pytest.mark.parametrize("bits", [None, 4], ids=["float", "int4"])
def test_every_config_matches_the_reference(cfg, bits, triton_device):
    # N = 72 and K = 264 are multiples of no tile; K = 264 also ends in half an int32 word of codes.
    i = CONFIGS.index(cfg)
    dtype = FLOAT_DTYPES[i % 3]
    group_size = INT4_GROUPS[i % 3] if bits else None
    kept, meta, scale, bias, dense = make(72, 264, bits=bits, group_size=group_size, dtype=dtype, seed=i,
                                          device=triton_device)
    x = torch.randn(_batch(cfg), 264).to(dtype).to(triton_device)
    y = sparse24_linear(x, kept, meta, scale, bias, in_features=264, group_size=group_size, bits=bits,
                        backend="triton", config=cfg)
    assert y.shape == (x.shape[0], 72) and y.dtype == dtype
    assert rel_err(y, reference64(x, dense, bias)) < REL_TOL[dtype]


# (M, N, K, bits, group_size, dtype, bias): M = 1, 3, 16; N not a tile multiple; small K and K = 576.
SHAPES = [
    (1, 40, 8, None, None, torch.float32, True),          # one metadata byte per row
    (1, 33, 576, None, None, torch.bfloat16, False),      # SmolLM2 hidden size, bf16
    (3, 40, 576, None, None, torch.float16, True),
    (16, 24, 136, None, None, torch.bfloat16, True),
    (1, 40, 576, 4, 64, torch.float16, False),            # int4 g64 at 576 = 9 groups
    (3, 33, 640, 4, 128, torch.bfloat16, True),           # int4 g128
    (16, 40, 576, 4, None, torch.float32, True),          # int4 per channel
    (1, 24, 24, 4, 8, torch.bfloat16, True),              # 3 groups of 8; half a code word
    (20, 40, 128, 4, 64, torch.float16, True),            # beyond the decode range: tiled tl.dot
    (300, 24, 64, None, None, torch.float32, True),       # large batch: dense weight + F.linear
]


@pytest.mark.parametrize("bits", [None, 4])
@pytest.mark.parametrize("block_n,split_k", [(32, 1), (64, 2)])
def test_one_token_tiles_that_fill_n_and_k(block_n, split_k, bits, triton_device):
    """N and K multiples of the tile: the kernel drops its masks (EVEN) and must still match."""
    cfg = tuning.KernelConfig("splitk", 1, block_n, 128, split_k, 1, 4, 1)
    kept, meta, scale, bias, dense = make(64, 256, bits=bits, group_size=128 if bits else None,
                                          dtype=torch.bfloat16, seed=3, device=triton_device)
    x = torch.randn(1, 256).to(torch.bfloat16).to(triton_device)
    y = sparse24_linear(x, kept, meta, scale, bias, in_features=256, group_size=128 if bits else None, bits=bits,
                        backend="triton", config=cfg)
    assert rel_err(y, reference64(x, dense, bias)) < REL_TOL[torch.bfloat16]


@pytest.mark.parametrize("m,n,k,bits,group_size,dtype,bias", SHAPES)
def test_shapes_with_the_chosen_config(m, n, k, bits, group_size, dtype, bias, triton_device):
    kept, meta, scale, b, dense = make(n, k, bits=bits, group_size=group_size, dtype=dtype, bias=bias, seed=m,
                                       device=triton_device)
    x = torch.randn(2, m, k).to(dtype).to(triton_device)         # leading dims are flattened
    y = sparse24_linear(x, kept, meta, scale, b, in_features=k, group_size=group_size, bits=bits, backend="triton")
    assert y.shape == (2, m, n) and y.dtype == dtype
    assert rel_err(y, reference64(x, dense, b)) < REL_TOL[dtype]


KERNEL_CONFIGS = [tuning.KernelConfig("splitk", 1, 32, 64, 4), tuning.KernelConfig("splitk", 16, 32, 128, 2),
                  tuning.KernelConfig("tiled", 16, 64, 64, 1)]


@pytest.mark.parametrize("bits", [None, 4], ids=["float", "int4"])
def test_an_all_zero_weight_gives_the_bias_exactly(bits, triton_device):
    w = torch.zeros(40, 128)
    bias = torch.randn(40)
    if bits is None:
        kept, meta = pack_24(w)
        scale = None
    else:
        kept, scale, meta = quantize_24_int4(w, 64)
    kept, meta, bias = kept.to(triton_device), meta.to(triton_device), bias.to(triton_device)
    scale = None if scale is None else scale.to(triton_device)
    x = torch.randn(5, 128, device=triton_device) * 1e3
    for cfg in KERNEL_CONFIGS:
        rows = 1 if cfg.block_m == 1 else 5
        y = sparse24_linear(x[:rows], kept, meta, scale, bias, in_features=128, group_size=64, bits=bits,
                            backend="triton", config=cfg)
        assert torch.equal(y, bias.expand(rows, 40)), cfg.name


@pytest.mark.parametrize("cfg", KERNEL_CONFIGS, ids=lambda c: c.name)
@pytest.mark.parametrize("bits", [None, 4], ids=["float", "int4"])
def test_a_corrupted_metadata_nibble_changes_the_output(cfg, bits, triton_device):
    """Negative control: moving one kept value of one row to another position of its group must
    break the agreement with the reference on the true metadata, and the kernel must still agree
    with the reference read through the same (corrupted) metadata."""
    kept, meta, scale, bias, dense = make(40, 128, bits=bits, group_size=64, dtype=torch.float32, seed=5,
                                          device=triton_device)
    rows = 1 if cfg.block_m == 1 else 3
    x = torch.randn(rows, 128, device=triton_device)
    run = dict(in_features=128, group_size=64, bits=bits, backend="triton", config=cfg)
    y = sparse24_linear(x, kept, meta, scale, bias, **run)
    assert rel_err(y, reference64(x, dense, bias)) < REL_TOL[torch.float32]
    row = 7
    codes = sparse24_weight(kept, meta, scale, in_features=128, group_size=64, bits=bits, dtype=torch.float32)[row]
    group = int((codes.reshape(-1, 4) != 0).sum(1).eq(2).nonzero()[0])     # a group with 2 nonzeros
    bad = meta.clone()
    byte, high = divmod(group, 2)
    nib = (int(bad[row, byte]) >> (4 * high)) & 15
    new = {0x4: 0x8, 0x8: 0xC, 0xC: 0x4, 0x9: 0xD, 0xD: 0xE, 0xE: 0x9}[nib]  # idx1 moves, idx0 stays
    bad[row, byte] = (int(bad[row, byte]) & (0xF0 if high == 0 else 0x0F)) | (new << (4 * high))
    y_bad = sparse24_linear(x, kept, bad, scale, bias, **run)
    assert rel_err(y_bad, reference64(x, dense, bias)) > 10 * REL_TOL[torch.float32]      # fails the check
    assert not torch.equal(y_bad[:, row], y[:, row]) and torch.equal(y_bad[:, :row], y[:, :row])
    dense_bad = sparse24_weight(kept, bad, scale, in_features=128, group_size=64, bits=bits, dtype=torch.float64)
    assert rel_err(y_bad, reference64(x, dense_bad, bias)) < REL_TOL[torch.float32]
    # A malformed nibble (both kept values at position 2) is refused at load, and read the same
    # way by the kernel and the reference: both values add into column 2.
    bad[row, byte] = (int(bad[row, byte]) & (0xF0 if high == 0 else 0x0F)) | (0xA << (4 * high))
    assert check_meta(bad.cpu()) is not None and f"row {row}, group {group}" in check_meta(bad.cpu())
    dense_bad = sparse24_weight(kept, bad, scale, in_features=128, group_size=64, bits=bits, dtype=torch.float64)
    y_bad = sparse24_linear(x, kept, bad, scale, bias, **run)
    assert rel_err(y_bad, reference64(x, dense_bad, bias)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("cfg", [c for c in CONFIGS if c.kind != "dense" and c.split_k == 1][:3] +
                         [tuning.KernelConfig("tiled", 64, 128, 128, 1)], ids=lambda c: c.name)
@pytest.mark.parametrize("bits", [None, 4], ids=["float", "int4"])
def test_every_output_element_is_written(cfg, bits, triton_device):
    from compress.kernels import sparse24_linear_triton as tk
    kept, meta, scale, bias, dense = make(72, 264, bits=bits, group_size=8, dtype=torch.float32,
                                          device=triton_device)
    m = _batch(cfg)
    x = torch.randn(m, 264, device=triton_device)
    out = torch.full((m, 72), float("nan"), device=triton_device)
    tk.sparse24_matmul(x, kept, meta, scale, bias, bits=bits, group_size=8, config=cfg, out=out)
    assert rel_err(out, reference64(x, dense, bias)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("values_dtype,x_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.float32),
                                                  (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("m", [1, 5])
def test_values_in_another_dtype_than_the_activations(values_dtype, x_dtype, m, triton_device):
    kept, meta, _, bias, _ = make(40, 136, bits=None, dtype=values_dtype, device=triton_device)
    x = torch.randn(m, 136).to(x_dtype).to(triton_device)
    y = sparse24_linear(x, kept, meta, None, bias.to(x_dtype), in_features=136, group_size=None, bits=None,
                        backend="triton")
    ref = sparse24_linear_reference(x.cpu().double(), kept.cpu(), meta.cpu(), None, bias.cpu().double(),
                                    in_features=136, group_size=None, bits=None)   # values cast to float64
    assert y.dtype == x_dtype and rel_err(y, ref) < REL_TOL[x_dtype]


def test_strided_values_and_empty_batch(triton_device):
    kept, meta, _, bias, dense = make(40, 64, bits=None, dtype=torch.float16, device=triton_device)
    wide = torch.zeros(40, 64, dtype=torch.float16, device=triton_device)
    wide[:, 1:33] = kept                                          # a misaligned, strided view
    x = torch.randn(1, 64, dtype=torch.float16, device=triton_device)
    y = sparse24_linear(x, wide[:, 1:33], meta, None, bias, in_features=64, group_size=None, bits=None,
                        backend="triton")
    assert rel_err(y, reference64(x, dense, bias)) < REL_TOL[torch.float16]
    y0 = sparse24_linear(x[:0], kept, meta, None, bias, in_features=64, group_size=None, bits=None, backend="triton")
    assert y0.shape == (0, 40)


@pytest.mark.skipif(not CUDA, reason="real layer shapes run on the GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("m", [1, 4, 16])
@pytest.mark.parametrize("n,k", [(14336, 4096), (4096, 14336)])
@pytest.mark.parametrize("bits", [None, 4])
def test_real_llama3_8b_shapes(m, n, k, bits, triton_device):
    kept, meta, scale, _, dense = make(n, k, bits=bits, group_size=128, dtype=torch.bfloat16, bias=False,
                                       device=triton_device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=triton_device)
    y = sparse24_linear(x, kept, meta, scale, None, in_features=k, group_size=128, bits=bits, backend="triton")
    assert rel_err(y, reference64(x, dense, None)) < REL_TOL[torch.bfloat16]
