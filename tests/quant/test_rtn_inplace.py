"""rtn_solve_inplace (row blocks, written into the weights) equals rtn_solve on the stacked rows."""

import pytest
import torch

from compress.kernels.packing import pack_int32, unpack_int32
from compress.quant.config import RTNConfig
from compress.quant.rtn import rtn_solve, rtn_solve_inplace

CASES = {
    "int4-g32": RTNConfig(bits=4, group_size=32),
    "int4-g32-partial-asym-mse": RTNConfig(bits=4, group_size=32, symmetric=False, observer="mse"),
    "int8-channel": RTNConfig(bits=8, group_size=None),
    "nvfp4a16": RTNConfig(scheme="nvfp4a16"),
    "mxfp4": RTNConfig(scheme="mxfp4"),
    "fp8-channel": RTNConfig(scheme="fp8"),
    "fp8-block": RTNConfig(scheme="fp8-block"),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_equals_stacked(case, dtype):
    cfg = CASES[case]
    cols = 96 if "partial" in case else 128
    rows = (256, 384) if case == "fp8-block" else (40, 72)          # fp8 blocks: whole 128-row blocks per weight
    gen = torch.Generator().manual_seed(0)
    weights = [(torch.randn(r, cols, generator=gen) * (0.02 + 0.5 * i)).to(dtype) for i, r in enumerate(rows)]
    weights[0][3, :5] = 0
    col_weight = torch.rand(cols, generator=gen) + 0.1 if cfg.observer == "mse" else None
    stacked = rtn_solve(torch.cat(weights), cfg, dtype, col_weight)
    # Tiny blocks: many row blocks per weight, each fitted and rounded apart.
    mine = [w.clone() for w in weights]
    results = rtn_solve_inplace(mine, cfg, dtype, col_weight, block_elements=7 * cols)
    assert results is not None
    row = 0
    for w, r in zip(mine, results):
        part = stacked.take_rows(slice(row, row + w.shape[0]))
        row += w.shape[0]
        assert r.weight is None
        assert torch.equal(r.codes.view(torch.uint8), part.codes.view(torch.uint8))
        assert torch.equal(r.scale.view(torch.uint8), part.scale.contiguous().view(torch.uint8))
        assert (r.zero_point is None) == (part.zero_point is None)
        if r.zero_point is not None:
            assert torch.equal(r.zero_point, part.zero_point)
        assert torch.equal(w, part.weight.to(dtype))                  # the dequantized rows, in place
        assert r.loss == pytest.approx(stacked.loss, rel=1e-5)
    if cfg.weight_format.kind == "nvfp4":
        assert torch.equal(results[0].global_scale, stacked.global_scale)


def test_shared_tensor_scale_is_not_cut():
    """fp8-static's one scale spans every row (and fp8 blocks a weight's end): the caller stacks."""
    w = [torch.randn(40, 64), torch.randn(24, 64)]
    assert rtn_solve_inplace(w, RTNConfig(scheme="fp8-static", group_size=None), torch.float32) is None
    assert rtn_solve_inplace(w, RTNConfig(scheme="fp8-block"), torch.float32) is None


def test_pack_int32_row_blocks_equal_whole(monkeypatch):
    import compress.kernels.packing as packing
    q = torch.randint(-8, 8, (37, 100), generator=torch.Generator().manual_seed(1), dtype=torch.int64).to(torch.int8)
    whole = pack_int32(q, 4)
    monkeypatch.setattr(packing, "_PACK_BLOCK_ELEMENTS", 3 * 100)
    blocked = pack_int32(q, 4)
    assert torch.equal(whole, blocked)
    assert torch.equal(unpack_int32(blocked, 4, 100), q)
