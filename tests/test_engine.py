import torch

from compress.data import CalibrationData
from compress.engine import capture_layer_inputs, run_layerwise, trace_groups
from compress.modeling import find_decoder_layers
from compress.stats import HessianStats
from conftest import tiny_model

EXPECTED_GROUPS = {
    "llama": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "qwen2": [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
              ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]],
    "opt": [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.out_proj"],
            ["fc1"], ["fc2"]],
}


class Recorder:
    """A method that records the Hessian each group saw and scales its weights by 0.5 ('solving')."""

    name = "recorder"

    def __init__(self, targets):
        self.targets = targets
        self.seen: dict[str, torch.Tensor] = {}
        self.order: list[list[str]] = []

    def is_target(self, name, module):
        return isinstance(module, torch.nn.Linear) and name.startswith(self.targets)

    def new_stats(self, module):
        return HessianStats(module.in_features)

    def solve(self, names, modules, stats):
        self.order.append(names)
        for n, m in zip(names, modules):
            self.seen[n] = stats.hessian.clone()
            m.weight.data.mul_(0.5)

    def finalize(self, root, prefix, names):
        pass


def test_decoder_layers_are_found(arch):
    name, layers = find_decoder_layers(tiny_model(arch))
    assert len(layers) == 2 and name in ("model.layers", "model.decoder.layers")


def test_trace_groups_linears_by_shared_input(arch, calib_ids):
    model = tiny_model(arch)
    _, layers = find_decoder_layers(model)
    chunks = capture_layer_inputs(model, layers, calib_ids, 8, torch.device("cpu"))
    targets = {n: m for n, m in layers[0].named_modules() if isinstance(m, torch.nn.Linear)}
    groups = trace_groups(layers[0], chunks[0], targets)
    assert [sorted(g) for g in groups] == [sorted(g) for g in EXPECTED_GROUPS[arch]]


def test_each_group_sees_inputs_of_the_already_solved_groups(arch, calib_ids):
    """True sequential: o_proj's Hessian must come from the *modified* q/k/v, and layer 1 from the
    modified layer 0, exactly as a plain forward of the modified model computes them."""
    model = tiny_model(arch)
    rec = Recorder(targets=find_decoder_layers(model)[0])
    run_layerwise(model, CalibrationData(calib_ids, "ids", 0), rec, progress=False)
    # Replay with the final (halved) weights and compare every recorded Hessian.
    layers_name, layers = find_decoder_layers(model)
    expected = {}
    hooks = []
    for name, module in model.named_modules():
        if name in rec.seen:
            hooks.append(module.register_forward_pre_hook(
                lambda m, a, name=name: expected.setdefault(name, HessianStats(m.in_features)).add(a[0])))
    with torch.no_grad():
        model(input_ids=calib_ids, use_cache=False)
    for h in hooks:
        h.remove()
    n_linears = sum(isinstance(m, torch.nn.Linear) for m in layers.modules())
    assert set(expected) == set(rec.seen) and len(rec.seen) == n_linears
    for name in rec.seen:
        torch.testing.assert_close(rec.seen[name], expected[name].hessian, rtol=1e-4, atol=1e-5)


def test_chunked_calibration_matches_one_pass(arch, calib_ids):
    results = {}
    for batch_size in (None, 3):                  # one chunk of 8, or chunks of 3, 3, 2
        model = tiny_model(arch)
        rec = Recorder(targets=find_decoder_layers(model)[0])
        run_layerwise(model, CalibrationData(calib_ids, "ids", 0), rec, batch_size=batch_size, progress=False)
        results[batch_size] = rec
    assert results[None].order == results[3].order
    for name, h in results[None].seen.items():
        torch.testing.assert_close(results[3].seen[name], h, rtol=1e-4, atol=1e-5)


def test_offloaded_model_gives_the_same_result(tmp_path, calib_ids):
    """A model whose decoder layers live on disk (accelerate offload) is compressed layer by layer
    with the same result as the same model held in memory."""
    from accelerate import dispatch_model

    reference = tiny_model("llama")
    rec_ref = Recorder(targets="model.layers")
    run_layerwise(reference, CalibrationData(calib_ids, "ids", 0), rec_ref, progress=False)

    model = tiny_model("llama")
    device_map = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.norm": "cpu",
                  "lm_head": "cpu", "model.layers.0": "disk", "model.layers.1": "disk"}
    model = dispatch_model(model, device_map=device_map, offload_dir=str(tmp_path))
    assert model.model.layers[0].self_attn.q_proj.weight.is_meta
    rec = Recorder(targets="model.layers")
    run_layerwise(model, CalibrationData(calib_ids, "ids", 0), rec, device="cpu", progress=False)
    assert rec.order == rec_ref.order
    for name, h in rec_ref.seen.items():
        torch.testing.assert_close(rec.seen[name], h, rtol=1e-4, atol=1e-5)


def test_input_stats_diag_and_amax_equal_the_hessian_stats():
    from compress.stats import HessianStats, InputStats
    x = torch.randn(3, 50, 24)
    h, i = HessianStats(24), InputStats(24)
    for chunk in x:
        h.add(chunk)
        i.add(chunk)
    torch.testing.assert_close(i.diag, h.diag, rtol=1e-5, atol=1e-6)
    assert torch.equal(i.amax, h.amax) and torch.equal(i.amax, x.abs().amax()) and i.tokens == h.tokens == 150
