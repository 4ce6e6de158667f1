"""The quantizer does not keep what it has finished with: a layer's dense weights are freed when the
layer is packed (not when the whole run ends), and GPTQ may take its Hessian sums in place."""

import contextlib
import gc
import weakref

import pytest
import torch

import compress
from compress.engine import engine_context
from compress.stats import HessianStats
from conftest import tiny_model


@pytest.mark.parametrize("calibrated", [False, True])
def test_dense_weights_freed_as_each_layer_finishes(calibrated, calib_ids):
    model = tiny_model("llama", num_hidden_layers=3)
    first = weakref.ref(model.model.layers[0].mlp.down_proj.weight)
    alive = []

    @contextlib.contextmanager
    def scope(index, prefix, layer):
        gc.collect()
        alive.append(first() is not None)
        yield layer

    cfg = compress.GPTQConfig(bits=4, group_size=32) if calibrated else compress.RTNConfig(bits=4, group_size=32)
    calib = compress.CalibrationData(calib_ids, "ids", 0) if calibrated else None
    with engine_context(layer_scope=scope):
        compress.quantize(model, cfg, calib, progress=False)
    # Layer 0's dense down_proj is gone by the time layer 1 starts (the quantizer held every replaced
    # linear until it was freed itself: an in-memory run peaked at the dense and packed model together).
    assert alive == [True, False, False]


def test_take_hessian_equals_hessian_and_gives_the_sums_away():
    stats = HessianStats(16)
    x = torch.randn(40, 16, generator=torch.Generator().manual_seed(0))
    stats.add(x)
    expected, diag = stats.hessian, stats.diag
    assert torch.equal(diag, expected.diagonal())
    taken = stats.take_hessian()
    assert torch.equal(taken, expected)
    with pytest.raises(RuntimeError, match="take_hessian"):
        stats.hessian
    with pytest.raises(RuntimeError, match="twice"):
        stats.take_hessian()
