"""Sparse24Linear: the module computes F.linear with its dense 2:4 weight, its state dict is exactly the
compact layout (version 1), it round-trips through a checkpoint, and it is about half a dense layer."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from compress.errors import CheckpointError, ConfigError
from compress.kernels.sparse24_linear import pack_24
from compress.pruning.sparse_linear import Sparse24Linear
from compress.quant.grid import compute_qparams, dequantize, quantize
from compress.runtime import set_backend


def random_24(n: int, k: int, dtype=torch.float32, seed: int = 0) -> torch.Tensor:
    """A 2:4 sparse weight of a real layer's size (N(0, 0.02)), with all-zero and one-nonzero groups."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k // 4, 4, generator=gen) * 0.02
    keep = torch.zeros_like(w, dtype=torch.bool)
    keep.scatter_(2, torch.rand(n, k // 4, 4, generator=gen).topk(2, dim=2).indices, True)
    keep[:, ::5, 1:] = False                                                   # one-nonzero (or zero) groups
    keep[:, ::7] = False                                                       # all-zero groups
    return (w * keep).reshape(n, k).to(dtype)


def _layout(module: Sparse24Linear) -> dict:
    return {k: (tuple(v.shape), v.dtype) for k, v in module.state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_from_dense_computes_linear_with_the_dense_weight(dtype):
    w, b = random_24(24, 64, dtype), torch.randn(24).to(dtype)
    module = Sparse24Linear.from_dense(w, b)
    assert torch.equal(module.dequantize(), w)
    x = torch.randn(2, 3, 64).to(dtype)                                        # leading dims kept
    y = module(x)
    assert y.shape == (2, 3, 24) and y.dtype == dtype
    assert torch.equal(y, nn.functional.linear(x, w, b))
    assert module.label == ("2:4 bf16" if dtype == torch.bfloat16 else "2:4 fp32")


def test_state_dict_is_exactly_the_float_layout():
    module = Sparse24Linear.from_dense(random_24(24, 64, torch.bfloat16), torch.zeros(24, dtype=torch.bfloat16))
    assert _layout(module) == {"weight_values": ((24, 32), torch.bfloat16), "weight_meta": ((24, 8), torch.uint8),
                               "weight_shape": ((2,), torch.int64), "bias": ((24,), torch.bfloat16)}
    assert module.weight_shape.tolist() == [24, 64]
    assert _layout(Sparse24Linear(64, 24, dtype=torch.bfloat16, bias=True)) == _layout(module)


@pytest.mark.parametrize("group_size,groups", [(None, 1), (64, 2), (128, 1)])
def test_state_dict_is_exactly_the_int4_layout(group_size, groups):
    module = Sparse24Linear.from_dense(random_24(24, 128, torch.float16), bits=4, group_size=group_size)
    assert _layout(module) == {"weight_packed": ((24, 8), torch.int32), "weight_scale": ((24, groups), torch.float16),
                               "weight_meta": ((24, 16), torch.uint8), "weight_shape": ((2,), torch.int64)}
    assert module.label == f"2:4 int4 {'ch' if group_size is None else f'g{group_size}'}"


@pytest.mark.parametrize("bits,group_size", [(None, None), (4, 64)])
def test_load_state_dict_into_a_fresh_module_round_trips(bits, group_size, tmp_path):
    w, b = random_24(40, 128, torch.bfloat16, seed=1), torch.randn(40).to(torch.bfloat16)
    module = Sparse24Linear.from_dense(w, b, bits=bits, group_size=group_size)
    save_file(module.state_dict(), str(tmp_path / "layer.safetensors"))
    fresh = Sparse24Linear(128, 40, bits=bits, group_size=group_size, bias=True, dtype=torch.bfloat16)
    x = torch.randn(3, 128, dtype=torch.bfloat16)
    assert not torch.equal(fresh(x), module(x))                              # negative control
    fresh.load_state_dict(load_file(str(tmp_path / "layer.safetensors")))
    fresh.check_meta("layer")
    for name, t in module.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], t), name
    assert torch.equal(fresh(x), module(x))


@pytest.mark.parametrize("group_size", [64, 128, None])
def test_int4_is_the_rtn_dequantized_dense_weight(group_size):
    w = random_24(32, 256, seed=2)
    module = Sparse24Linear.from_dense(w, bits=4, group_size=group_size)
    scale, zp = compute_qparams(w, 4, group_size, True, torch.float32)
    rtn = dequantize(quantize(w, scale, zp, 4, group_size), scale, None, group_size, torch.float32)
    assert torch.equal(module.dequantize(), rtn)                # dropped entries quantize to code 0
    assert ((module.dequantize() - w).norm() / w.norm()).item() < 0.15   # int4 RTN error, not garbage
    assert not torch.equal(module.dequantize(), w)                        # negative control: really int4
    x = torch.randn(5, 256)
    torch.testing.assert_close(module(x), x @ rtn.T, rtol=0, atol=1e-6)


def test_from_parts_takes_a_solvers_codes():
    w = random_24(16, 64, seed=3)
    _, meta = pack_24(w)
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(-8, 8, (16, 32), generator=gen)
    scale = torch.rand(16, 2, generator=gen) + 0.5
    module = Sparse24Linear.from_parts(meta, codes=codes, scale=scale, group_size=32)
    cols = torch.tensor([[4 * (k // 2) + ((int(meta[r, k // 4]) >> (2 * (k % 4))) & 3) for k in range(32)]
                         for r in range(16)])
    expected = torch.zeros(16, 64).scatter_(1, cols, codes.float() * scale.gather(1, cols // 32))
    assert torch.equal(module.dequantize(), expected)
    with pytest.raises(ConfigError, match="scale="):
        Sparse24Linear.from_parts(meta, codes=codes)
    with pytest.raises(ConfigError, match="not both"):
        Sparse24Linear.from_parts(meta, codes=codes, values=codes.float(), scale=scale)


def test_checkpoint_is_about_half_of_dense():
    """bf16 values + meta: in/2 * 2 + in/8 bytes per row, 0.5625x dense; int4 g128: codes + meta + scales."""
    out, k = 64, 512
    per_row = {None: k // 2 * 2 + k // 8, 4: k // 4 + k // 8 + k // 128 * 2}
    for bits, row_bytes in per_row.items():
        w = random_24(out, k, torch.bfloat16)
        module = Sparse24Linear.from_dense(w, bits=bits, group_size=128 if bits else None)
        stored = sum(t.numel() * t.element_size() for n, t in module.state_dict().items() if n != "weight_shape")
        assert stored == out * row_bytes
    assert per_row[None] / (2 * k) == 0.5625 and per_row[4] / (2 * k) < 0.2


def test_bad_configurations_are_refused():
    with pytest.raises(ConfigError, match=r"\(8, 60\).*leave this layer dense"):
        Sparse24Linear(60, 8)
    with pytest.raises(ConfigError, match="bits=8"):
        Sparse24Linear(64, 8, bits=8)
    with pytest.raises(ConfigError, match="needs bits=4"):
        Sparse24Linear(64, 8, group_size=32)
    with pytest.raises(ConfigError, match="multiple of 8 dividing in_features 64"):
        Sparse24Linear(64, 8, bits=4, group_size=48)
    dense = torch.tensor([[1.0, 0, 0, 1, 1, 1, 0, 1]])
    with pytest.raises(ConfigError, match="row 0, group 1 .*3 nonzeros"):
        Sparse24Linear.from_dense(dense)


def test_malformed_metadata_is_refused_by_name():
    module = Sparse24Linear.from_dense(random_24(8, 64))
    module.check_meta("model.layers.0.mlp.up_proj")
    module.weight_meta[3, 2] = 0x45                           # group 4 of row 3: positions (1, 1)
    with pytest.raises(CheckpointError, match=r"up_proj.weight_meta .*row 3, group 4 .*re-export"):
        module.check_meta("model.layers.0.mlp.up_proj")


def test_set_backend_finds_float_and_int4_layers():
    model = nn.Sequential(Sparse24Linear.from_dense(random_24(16, 64)),
                          Sparse24Linear.from_dense(random_24(16, 16), bits=4), nn.Linear(16, 4))
    assert set_backend(model, "torch") == 2
    assert [m.backend for m in model[:2]] == ["torch", "torch"]


def _triton_runs() -> bool:
    return importlib.util.find_spec("triton") is not None and (
        torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")


@pytest.mark.skipif(not _triton_runs(), reason="needs Triton on a GPU or under TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [None, 4])
def test_triton_backend_matches_torch_backend(bits):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = Sparse24Linear.from_dense(random_24(40, 128, seed=4), torch.randn(40), bits=bits,
                                       group_size=64 if bits else None).to(device)
    x = torch.randn(2, 128, device=device)
    module.backend = "torch"
    ref = module(x)
    module.backend = "triton"
    torch.testing.assert_close(module(x), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module(x[:1]), ref[:1], rtol=1e-5, atol=1e-6)     # M = 1
