"""The fold alone leaves the float model's outputs unchanged, on every family of the 16-family table;
a wrong fold changes them; families (or layouts) the table does not cover are refused before any change."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import compress
from compress.errors import ConfigError
from compress.smoothing import AWQConfig, SmoothQuantConfig
from compress.smoothing import mappings as mp
from compress.smoothing.fold import fold, norm_offset, per_row
from compress.structure import prepare_model
from test_families import FAMILIES, IDS, build, calib

pytestmark = pytest.mark.usefixtures("one_thread")


def _outliers(model) -> None:
    """Give the residual stream a few large channels (as real LLMs have), so the scales are far from 1."""
    emb = model.get_input_embeddings().weight
    with torch.no_grad():
        emb[:, :3] *= 20.0


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(params=sorted(FAMILIES))
def family(request) -> str:
    return request.param


def test_the_fold_leaves_float_logits_unchanged_on_every_family(family):
    model = build(family)
    _outliers(model)
    prepare_model(model)
    with torch.no_grad():
        ref = model(IDS).logits
    before = _state(model)
    records = compress.apply(model, SmoothQuantConfig(alpha=0.8, smooth_linears=True), calib(8), progress=False)
    smoothed = [r for r in records.values() if "loss_after" in r]
    assert smoothed, records
    changed = [k for k, v in model.state_dict().items() if not torch.equal(before[k], v)]
    assert changed                                                  # negative control: weights did move
    with torch.no_grad():
        out = model(IDS).logits
    assert (out - ref).abs().max() < 1e-4 * max(1.0, float(ref.abs().max()))
    names = {r_name for r_name in records}
    if family == "olmo2":                                           # post-norm: no norm mapping exists
        assert all("layernorm" not in n for n in names)


def test_a_wrong_fold_changes_the_outputs():
    """Negative controls: Gemma's (1 + w) norm folded as if it were x * w, or only the consumers scaled."""
    for family, offset in (("gemma2", 0.0), ("mistral", None)):
        model = build(family)
        prepare_model(model)
        layer = model.model.layers[0]
        with torch.no_grad():
            ref = model(IDS).logits
        s = torch.linspace(0.5, 2.0, 64)
        consumers = [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
        if offset is None:                                          # consumers only: producer forgotten
            from compress.smoothing.fold import scale_columns
            scale_columns(consumers, s)
        else:
            assert norm_offset(layer.input_layernorm) == 1.0
            fold(layer.input_layernorm, consumers, s, None, offset)
        with torch.no_grad():
            assert (model(IDS).logits - ref).abs().max() > 1e-3


def test_norm_offsets_are_probed():
    assert norm_offset(build("gemma3_text").model.layers[0].input_layernorm) == 1.0
    assert norm_offset(build("mistral").model.layers[0].input_layernorm) == 0.0
    assert norm_offset(build("stablelm").model.layers[0].input_layernorm) == 0.0     # LayerNorm with bias


def test_gqa_scales_are_equal_across_the_query_heads_of_one_kv_head():
    rows = mp.v_rows("separate")(type("C", (), {"num_attention_heads": 4})(), torch.nn.Linear(64, 32),
                                 torch.nn.Linear(64, 64))
    assert rows.tolist()[:16] == list(range(16)) and rows.tolist()[16:32] == list(range(16))   # heads 0, 1 -> kv 0
    values = per_row(torch.arange(64.0), rows, "amax")
    assert torch.equal(values[:16], values[16:32]) and torch.equal(values[:16], torch.arange(16.0, 32.0))


def test_unknown_families_are_refused_before_any_change():
    model = build("mistral")
    model.config.model_type = "bloom"
    before = _state(model)
    with pytest.raises(ConfigError, match="model type 'bloom'.*FAMILIES"):
        compress.apply(model, AWQConfig(group_size=32), calib(4), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_post_norm_olmo2_has_nothing_for_smoothquants_default_mappings():
    model = build("olmo2")
    before = _state(model)
    with pytest.raises(ConfigError, match="olmo2.*post-norm.*smooth_linears"):
        compress.apply(model, SmoothQuantConfig(), calib(4), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_table_that_does_not_describe_the_model_is_refused_and_the_layer_restored(monkeypatch):
    """v -> o declared with the wrong GQA grouping (query head h read from kv head h % 2 instead of
    h // 2): the per-layer output check catches it."""
    def wrong_rows(config, producer, consumer):
        return torch.arange(64) % 32

    wrong = mp.Family(tuple(dataclasses.replace(m, rows=wrong_rows) if m.producer == "self_attn.v_proj"
                            else m for m in mp.FAMILIES["mistral"].mappings))
    monkeypatch.setitem(mp.FAMILIES, "mistral", wrong)
    model = build("mistral")
    _outliers(model)
    before = _state(model)
    with pytest.raises(ConfigError, match="changed the float output of model.layers.0"):
        compress.apply(model, SmoothQuantConfig(smooth_linears=True), calib(4), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_norm_reader_the_table_does_not_list_is_refused(monkeypatch):
    """Cohere's input norm also feeds the MLP: a table without gate/up there must not fold silently."""
    qkv_only = mp.Family((mp.Mapping("input_layernorm", mp.QKV),) + mp.FAMILIES["cohere"].mappings[1:])
    monkeypatch.setitem(mp.FAMILIES, "cohere", qkv_only)
    model = build("cohere")
    with pytest.raises(ConfigError, match="input_layernorm also feeds mlp.gate_proj, mlp.up_proj"):
        compress.apply(model, SmoothQuantConfig(), calib(4), progress=False)
