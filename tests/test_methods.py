"""The method contract: a method written here, outside the package, plugs in with one
``register_method`` call and runs through the API, the CLI and a recipe; and a method that transforms
a layer before it is observed (the hook smoothing and rotations need) gets the same result from the
engine's one-pass and chunked paths."""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import compress
from compress.cli import main
from compress.configs import MethodConfig, method_of, methods, register_method, unregister_method
from compress.data import CalibrationData
from compress.engine import LayerMethod, compress_layers, select_linears, write_rows
from compress.errors import ConfigError
from compress.quant.grid import compute_qparams, dequantize, quantize
from compress.recipe import recipe_from_dict, run_recipe
from compress.stats import HessianStats
from conftest import tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")


# --- a toy method: scale every targeted weight by a factor ------------------------------------------

@dataclasses.dataclass
class ScaleConfig(MethodConfig):
    """Multiply the weights of every linear (except ``ignore``) by ``factor``."""

    method = "toy_scale"
    factor: float = 0.5
    ignore: list[str] = dataclasses.field(default_factory=lambda: ["lm_head"])

    def validate(self) -> None:
        if self.factor == 0:
            raise ConfigError("factor must not be 0")


class Scaler(LayerMethod):
    def __init__(self, model, cfg: ScaleConfig):
        self.cfg, self.name, self.records = cfg, cfg.method, {}
        self.targets = select_linears(model, cfg.ignore, verb="scale", left="as it is")

    def solve(self, names, modules, stats):
        assert stats is None                                   # registered without data
        write_rows(modules, torch.cat([m.weight.detach() for m in modules]) * self.cfg.factor)
        self.records.update({n: self.cfg.factor for n in names})


def scale_weights(model, cfg, calib=None, *, device=None, batch_size=None, progress=True):
    scaler = Scaler(model, cfg)
    compress_layers(model, scaler, None, device=device, progress=progress)
    return scaler.records


@pytest.fixture
def toy():
    register_method(ScaleConfig, scale_weights, area="quantize", needs_data=False)
    yield ScaleConfig
    unregister_method("toy_scale")


def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def test_registration_is_read_by_the_registry(toy):
    m = method_of("toy_scale")
    assert m.config is ScaleConfig and m.handler is scale_weights and m.area == "quantize"
    assert method_of(ScaleConfig()) is m and m in methods("quantize") and m not in methods("prune")
    assert compress.registered_methods()["toy_scale"] is ScaleConfig and not m.needs_data(ScaleConfig())


def test_registration_refuses_duplicates_and_bad_fields(toy):
    with pytest.raises(TypeError, match="registered twice"):
        register_method(ScaleConfig, scale_weights, area="quantize")

    @dataclasses.dataclass
    class Other(MethodConfig):
        method = "toy_other"

    for kwargs, message in [(dict(area="compile"), "area"), (dict(area="prune", statistics="moments"), "statistics"),
                            (dict(area="prune", options=("tokenizer",)), "not supplied by the runner")]:
        with pytest.raises(TypeError, match=message):
            register_method(Other, scale_weights, **kwargs)
    assert "toy_other" not in compress.registered_methods()
    with pytest.raises(ConfigError, match="no registered method for 'toy_other'"):
        method_of("toy_other")


def test_the_builtin_methods_are_registered_once_each():
    names = [m.name for m in methods()]
    assert sorted(names) == sorted(set(names))
    assert {"rtn", "gptq", "kv_cache", "magnitude", "wanda", "sparsegpt", "structured", "lora", "distill"} <= set(names)
    needs = {m.name: m.needs_data(m.config()) for m in methods() if m.name in ("rtn", "gptq", "magnitude", "wanda")}
    assert needs == {"rtn": False, "gptq": True, "magnitude": False, "wanda": True}
    assert method_of("rtn").needs_data(compress.RTNConfig(scheme="nvfp4"))          # W4A4 activation scales


def test_api_runs_a_registered_method_and_checks_its_area(toy):
    model = tiny_model("llama")
    before = _linear_weights(model)
    records = compress.quantize(model, ScaleConfig(factor=0.5), progress=False)
    after = _linear_weights(model)
    assert set(records) == set(before) - {"lm_head"}
    for name in records:
        torch.testing.assert_close(after[name], before[name] * 0.5, rtol=0, atol=0)
    assert torch.equal(after["lm_head"], before["lm_head"])                          # ignored: untouched
    with pytest.raises(ConfigError, match=r"prune\(\) takes a pruning config, got ScaleConfig"):
        compress.prune(model, ScaleConfig())
    with pytest.raises(ConfigError, match=r"toy_scale takes no option\(s\) \['teacher'\]"):
        compress.apply(model, ScaleConfig(), teacher=model)


def _scaled(ckpt, reference, factor):
    tensors = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        tensors.update(load_file(f))
    name = "model.layers.0.mlp.down_proj.weight"
    return torch.equal(tensors[name], reference[name] * factor)


def test_a_recipe_runs_a_registered_method(toy, base, tmp_path):
    reference = tiny_model("llama").state_dict()
    recipe = recipe_from_dict({"version": 1, "model": str(base), "passes": [{"method": "toy_scale", "factor": 0.25}],
                               "export": {"output": str(tmp_path / "out")}})
    assert recipe.passes == [ScaleConfig(factor=0.25)]
    assert recipe_from_dict(recipe.to_dict()) == recipe
    report = run_recipe(recipe, progress=False, echo=lambda *_: None)
    assert report.rows[1].name == "toy_scale" and _scaled(tmp_path / "out", reference, 0.25)
    with pytest.raises(ConfigError, match=r"passes\[0\] \(toy_scale\): unknown key 'factr' \(did you mean 'factor'"):
        recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "toy_scale", "factr": 2}]})
    with pytest.raises(ConfigError, match="factor must not be 0"):
        recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "toy_scale", "factor": 0}]})


def test_the_cli_runs_a_registered_method(toy, base, tmp_path, capsys):
    reference = tiny_model("llama").state_dict()
    out = tmp_path / "cli"
    assert main(["-q", "quantize", str(base), "--method", "toy_scale", "--set", "factor=2", "--output", str(out)]) == 0
    assert _scaled(out, reference, 2.0)
    (tmp_path / "r.yaml").write_text(f"version: 1\nmodel: {base}\npasses:\n  - method: toy_scale\n    factor: 4\n"
                                     f"export:\n  output: {tmp_path / 'run'}\n")
    assert main(["-q", "run", str(tmp_path / "r.yaml")]) == 0
    assert _scaled(tmp_path / "run", reference, 4.0)
    assert main(["-q", "quantize", str(base), "--method", "toy_scale", "--set", "fator=2", "-o", str(tmp_path / "x")]) == 2
    assert "unknown key 'fator'" in capsys.readouterr().err


def test_recipe_and_cli_check_the_registered_data_need(toy, base, tmp_path, capsys):
    unregister_method("toy_scale")
    register_method(ScaleConfig, scale_weights, area="quantize", needs_data=lambda cfg: cfg.factor > 1)
    with pytest.raises(ConfigError, match=r"\['toy_scale'\] need calibration data"):
        recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "toy_scale", "factor": 2}]})
    recipe_from_dict({"version": 1, "model": "m", "passes": [{"method": "toy_scale", "factor": 0.5}]})
    assert main(["quantize", str(base), "--method", "toy_scale", "--set", "factor=2", "-o", str(tmp_path / "x")]) == 2
    assert "--method toy_scale needs --calib FILE" in capsys.readouterr().err


# --- a toy smoothing method: the layer-transform hook in both engine paths ---------------------------

class AbsMax:
    def __init__(self, module):
        self.amax = torch.zeros(module.in_features)

    def add(self, x):
        self.amax = torch.maximum(self.amax, x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float())


class Smoother(LayerMethod):
    """SmoothQuant-like: before its linears are observed, divide the input norm's scale by
    s = sqrt(max|x|) per channel and multiply q/k/v's columns by s (the float layer computes the
    same function); then record each group's Hessian and round the weights to int4 per channel."""

    name = "toy smooth"

    def __init__(self, model, smooth: bool = True):
        self.targets = select_linears(model, ["lm_head"], verb="smooth", left="as it is")
        self.smooth, self.hessians, self.scales = smooth, {}, {}

    def prepare_layer(self, layer, prefix, inputs):
        if not self.smooth or inputs is None:
            return
        qkv = ("q_proj", "k_proj", "v_proj")
        amax = inputs.observe({"q": layer.self_attn.q_proj}, AbsMax)["q"].amax
        s = amax.clamp(min=1e-5).sqrt()
        layer.input_layernorm.weight.data /= s
        for name in qkv:
            getattr(layer.self_attn, name).weight.data *= s
        self.scales[prefix] = s

    def new_stats(self, module):
        return HessianStats(module.in_features)

    def solve(self, names, modules, stats):
        for name in names:
            self.hessians[name] = stats.hessian.clone()
        for m in modules:
            scale, zp = compute_qparams(m.weight.detach().float(), 4, None, True, torch.float32)
            m.weight.data = dequantize(quantize(m.weight.detach().float(), scale, zp, 4, None), scale, None, None,
                                       torch.float32)


def _smooth(calib, batch_size, smooth=True):
    model = tiny_model("llama")
    method = Smoother(model, smooth)
    compress_layers(model, method, calib, device="cpu", batch_size=batch_size, progress=False)
    return model, method


def test_layer_transform_gives_the_same_result_in_one_pass_and_in_chunks(calib_ids):
    calib = CalibrationData(calib_ids, "ids", 0)
    one, m1 = _smooth(calib, batch_size=None)              # all 8 samples in one chunk: solved in pre-hooks
    chunked, m2 = _smooth(calib, batch_size=3)             # 3 chunks: one observation pass per group
    assert set(m1.hessians) == set(m2.hessians) == set(m1.targets)
    for name in m1.hessians:
        torch.testing.assert_close(m1.hessians[name], m2.hessians[name], rtol=1e-5, atol=1e-6)
    for (n, a), (_, b) in zip(one.state_dict().items(), chunked.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=n)


def test_layer_transform_runs_before_the_layer_is_observed(calib_ids):
    calib = CalibrationData(calib_ids, "ids", 0)
    for batch_size in (None, 3):
        _, smoothed = _smooth(calib, batch_size)
        _, plain = _smooth(calib, batch_size, smooth=False)
        # Layer 0 sees the same inputs either way; smoothing divides q/k/v's input by s, so the
        # Hessian its solve sees must be D^-1 H D^-1 (it would be H if the norm were rescaled after
        # the input had been observed).
        s = smoothed.scales["model.layers.0."]
        name = "model.layers.0.self_attn.q_proj"
        expected = plain.hessians[name] / s[:, None] / s[None, :]
        torch.testing.assert_close(smoothed.hessians[name], expected, rtol=1e-4, atol=1e-6)
        assert not torch.allclose(smoothed.hessians[name], plain.hessians[name], rtol=1e-2)


def test_layer_transform_alone_keeps_the_float_model(calib_ids):
    model = tiny_model("llama")
    with torch.no_grad():
        before = model(calib_ids).logits

    class SmoothOnly(Smoother):
        def solve(self, names, modules, stats):
            pass

    compress_layers(model, SmoothOnly(model), CalibrationData(calib_ids, "ids", 0), device="cpu", progress=False)
    with torch.no_grad():
        after = model(calib_ids).logits
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, tiny_model("llama").model.layers[0]
                           .input_layernorm.weight)
