"""The checks every entry call makes before any work: the device exists, the weights are finite."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import compress
from compress.data import CalibrationData
from compress.errors import CheckpointError, ConfigError
from compress.guards import check_device, check_finite
from compress.pruning.config import WandaConfig
from compress.quant.config import GPTQConfig, RTNConfig
from compress.quant.linear import QuantLinear
from conftest import tiny_model


def _poisoned(arch: str = "llama") -> nn.Module:
    """A tiny model with 3 NaN/inf in layer 0's up_proj and one NaN in layer 1's q_proj."""
    model = tiny_model(arch)
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
        model.model.layers[1].self_attn.q_proj.weight[2, 5] = float("nan")
    return model


def test_non_finite_weights_are_named():
    with pytest.raises(CheckpointError, match=r"^model.layers.0.mlp.up_proj.weight has 3 NaN/inf values, "
                                              r"model.layers.1.self_attn.q_proj.weight has 1 NaN/inf value; the "
                                              r"checkpoint is corrupt or was overflowed in float16 - reload it in "
                                              r"float32/bfloat16"):
        check_finite(_poisoned())
    check_finite(tiny_model("llama"))                                     # negative control


def test_more_than_three_bad_tensors_are_counted_not_listed():
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            for proj in (layer.mlp.up_proj, layer.mlp.gate_proj):
                proj.weight[0, 0] = float("nan")
    assert len(model.model.layers) == 2                                  # 4 bad tensors: 3 named, 1 counted
    with pytest.raises(CheckpointError, match=r"gate_proj.weight has 1 NaN/inf value \(and 1 more tensor\); the"):
        check_finite(model)


def test_meta_integer_and_non_scale_buffers_are_skipped_but_scales_are_checked(calib_ids):
    model = tiny_model("llama")
    model.model.layers[0].mlp.register_buffer("mask", torch.full((4,), -float("inf")))      # a mask may be -inf
    model.model.layers[0].mlp.register_parameter("offloaded", nn.Parameter(torch.empty(8, device="meta")))
    check_finite(model)
    compress.quantize(model, RTNConfig(group_size=32), progress=False)
    down = model.model.layers[1].mlp.down_proj
    assert isinstance(down, QuantLinear)
    check_finite(model)                                                   # packed int32 codes are not floats
    with torch.no_grad():
        down.weight_scale[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"model.layers.1.mlp.down_proj.weight_scale has 1 NaN/inf value"):
        check_finite(model)


@pytest.mark.parametrize("method", ["rtn", "gptq", "wanda"])
def test_every_method_refuses_non_finite_weights_before_touching_the_model(method, calib_ids):
    model = _poisoned()
    calib = CalibrationData(calib_ids, "ids", 0)
    cfg = {"rtn": RTNConfig(group_size=32), "gptq": GPTQConfig(group_size=32), "wanda": WandaConfig()}[method]
    entry = compress.prune if method == "wanda" else compress.quantize
    before = model.model.layers[1].mlp.down_proj.weight.clone()
    with pytest.raises(CheckpointError, match=r"model.layers.0.mlp.up_proj.weight has 3 NaN/inf values"):
        entry(model, cfg, calib=None if method == "rtn" else calib, progress=False)
    assert type(model.model.layers[1].mlp.down_proj) is nn.Linear
    assert torch.equal(model.model.layers[1].mlp.down_proj.weight, before)


def test_cuda_without_a_cuda_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match=r"^--device cuda: torch sees no CUDA device on this machine; use --device "
                                          r"cpu or omit --device$"):
        check_device("cuda", "--device")
    with pytest.raises(ConfigError, match=r"^device cuda:1: torch sees no CUDA device.*use device 'cpu' or leave"):
        check_device("cuda:1")
    with pytest.raises(ConfigError, match=r"device gpu: not a device name"):
        check_device("gpu")
    assert check_device(None) is None and check_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="torch sees no CUDA device"):
        compress.quantize(tiny_model("llama"), RTNConfig(group_size=32), device="cuda", progress=False)


def test_a_cuda_index_past_the_last_device_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ConfigError, match=r"--device cuda:2: this machine has 2 CUDA device\(s\), cuda:0 to cuda:1"):
        check_device("cuda:2", "--device")
    assert check_device("cuda:1") == torch.device("cuda", 1)
