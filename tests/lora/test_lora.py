"""PERP retraining: LoRA + norms + biases lower the loss of a pruned model, and the merge keeps the
sparsity mask exactly (a plain merge, the negative control, does not)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.configs import config_from_dict
from compress.data import CalibrationData
from compress.errors import ConfigError
from compress.lora.adapters import LoRAConfig, LoRALinear, merge_lora, merged_weight, unwrap_lora, wrap_lora
from compress.lora.train import causal_lm_loss, lora_retrain, lr_factor, retrain

from conftest import VOCAB, tiny_model

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors gain nothing from a second OpenMP thread, and on a busy shared 2-core machine
    its barrier waits made this file take 72 s instead of 2.5 s."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# A few fast steps at a learning rate high enough to move a tiny model on a fixed batch.
FAST = dict(steps=12, batch_size=4, learning_rate=1e-2, warmup_steps=0)


def _calib(samples=4, seqlen=16, seed=1) -> CalibrationData:
    g = torch.Generator().manual_seed(seed)
    return CalibrationData(torch.randint(0, VOCAB, (samples, seqlen), generator=g), "random ids", seed)


def _linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n}


@torch.no_grad()
def _prune(model, kind: str):
    """Magnitude pruning in a few lines: per row keep the larger half ("50%"), or keep the 2
    largest |w| of every 4 consecutive inputs ("2:4")."""
    for m in _linears(model).values():
        w = m.weight
        if kind == "50%":
            w.scatter_(1, w.abs().topk(w.shape[1] // 2, dim=1, largest=False).indices, 0.0)
        else:
            groups = w.view(w.shape[0], -1, 4)                                  # (out, in/4, 4)
            groups.scatter_(2, groups.abs().topk(2, dim=2, largest=False).indices, 0.0)
    return model


def _zeros(model) -> dict[str, torch.Tensor]:
    return {n: m.weight == 0 for n, m in _linears(model).items()}


@torch.no_grad()
def _loss(model, calib) -> float:
    return float(causal_lm_loss(model.eval(), calib.input_ids))


def _holds_2_4(w: torch.Tensor) -> bool:
    return bool(((w != 0).view(w.shape[0], -1, 4).sum(dim=2) <= 2).all())


@pytest.mark.parametrize("kind", ["50%", "2:4"])
def test_retraining_lowers_the_loss_and_keeps_the_mask_exactly(kind):
    model, calib = _prune(tiny_model("llama"), kind), _calib()
    zeros, before = _zeros(model), _loss(model, calib)
    weights = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    result = retrain(model, LoRAConfig(**FAST), calib, progress=False)
    assert _loss(model, calib) < before - 0.2                              # the merged model, not the adapters
    assert result.last_loss < result.first_loss and result.steps == FAST["steps"]
    after = _linears(model)
    assert set(after) == set(zeros) and all(type(m) is nn.Linear for m in after.values())
    for name, m in after.items():
        assert torch.equal(m.weight == 0, zeros[name]), name               # every zero stays zero, no new ones
        assert not torch.equal(m.weight, weights[name]), name              # ... and the kept weights moved
        assert kind != "2:4" or _holds_2_4(m.weight)
        assert result.layers[name].before == result.layers[name].after == pytest.approx(0.5)
    assert result.max_mask_deviation == 0.0


def test_plain_merge_fills_the_pruned_zeros():
    """Negative control: keep_mask=False merges W + s*B@A, and the zeros do not survive."""
    model, calib = _prune(tiny_model("llama"), "50%"), _calib()
    result = retrain(model, LoRAConfig(**FAST, keep_mask=False, mask_during_training=False), calib,
                     progress=False)
    for name, m in _linears(model).items():
        assert float((m.weight == 0).float().mean()) < 0.01, name
        assert result.layers[name].after < result.layers[name].before
    assert result.max_mask_deviation > 0


def _pruned_lora(rows=24, cols=32, rank=4, masked=False, seed=0, dropout=0.0) -> LoRALinear:
    g = torch.Generator().manual_seed(seed)
    base = nn.Linear(cols, rows, bias=True)
    with torch.no_grad():
        base.weight.mul_(torch.rand(rows, cols, generator=g) > 0.5)
    m = LoRALinear(base, rank, alpha=8.0, mask=base.weight != 0, mask_during_training=masked, dropout=dropout)
    with torch.no_grad():
        m.lora_B.normal_(generator=g)                          # a trained-looking update (B starts at zero)
    return m


def test_merged_weight_is_the_formula():
    m = _pruned_lora()
    w, a, b, mask = m.base.weight, m.lora_A, m.lora_B, m.mask
    expect = (w + 2.0 * b @ a) * mask
    torch.testing.assert_close(merged_weight(w, a, b, 2.0, mask), expect, rtol=0, atol=1e-6)
    assert torch.all(merged_weight(w, a, b, 2.0, mask)[~mask] == 0)
    assert (merged_weight(w, a, b, 2.0, None)[~mask] != 0).all()            # plain merge fills them
    assert merged_weight(w.bfloat16(), a, b, 2.0, mask).dtype == torch.bfloat16


def test_merge_is_exact_when_training_saw_the_mask_and_drops_the_masked_part_otherwise():
    x = torch.randn(5, 32, generator=torch.Generator().manual_seed(3))
    exact = _pruned_lora(masked=True)
    with torch.no_grad():
        adapter = exact(x)
        assert torch.equal(merge_lora(exact)(x), adapter)                  # one matmul with the merged weight
    two_paths = _pruned_lora(masked=True, dropout=0.1).eval()                # dropout: base + masked update
    with torch.no_grad():
        adapter = two_paths(x)
        torch.testing.assert_close(merge_lora(two_paths)(x), adapter, rtol=0, atol=1e-5)
    cheap = _pruned_lora(masked=False)
    with torch.no_grad():
        adapter = cheap(x)
        dropped = F.linear(x, cheap.scale * (cheap.lora_B @ cheap.lora_A) * ~cheap.mask)  # update on pruned weights
        merged = merge_lora(cheap)(x)
    torch.testing.assert_close(adapter - merged, dropped, rtol=0, atol=1e-5)
    assert dropped.abs().max() > 0.1


def test_wrapping_freezes_the_base_and_changes_nothing_until_trained():
    model = _prune(tiny_model("llama"), "50%").to(torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.add_(1e-3)          # make one layer dense again
        before = model(_calib().input_ids).logits
        wrapped = wrap_lora(model, LoRAConfig())
        torch.testing.assert_close(model(_calib().input_ids).logits, before, rtol=0, atol=0)   # B = 0
    assert len(wrapped) == 14
    for name, m in wrapped.items():
        assert m.lora_A.dtype == m.lora_B.dtype == torch.float32 and m.base.weight.dtype == torch.bfloat16
        assert not any(p.requires_grad for p in m.base.parameters())
        assert (m.mask is None) == name.endswith("layers.1.mlp.down_proj"), name
        assert m.mask is None or m.mask.dtype == torch.bool


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_the_adapter_model_and_the_merged_model_agree(dtype):
    model, calib = _prune(tiny_model("llama").to(dtype), "50%"), _calib()
    bases = {n: m.weight.detach().clone() for n, m in _linears(model).items()}
    retrain(model, LoRAConfig(**{**FAST, "steps": 4}, merge=False, mask_during_training=True), calib,
            progress=False)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    assert set(wrapped) == set(bases)
    for name, m in wrapped.items():
        assert torch.equal(m.base.weight, bases[name])               # the frozen base never moved
        assert not m.base.weight.requires_grad and m.lora_A.requires_grad
    expect = {n: merged_weight(m.base.weight, m.lora_A, m.lora_B, m.scale, m.mask) for n, m in wrapped.items()}
    with torch.no_grad():
        adapter_logits = model(calib.input_ids).logits
        unwrap_lora(model, wrapped)
        merged_logits = model(calib.input_ids).logits
    assert torch.equal(merged_logits, adapter_logits)                 # bit for bit, in either dtype
    for name, m in _linears(model).items():
        assert torch.equal(m.weight, expect[name])


def test_only_adapters_norms_and_biases_train_and_hold_optimizer_state(monkeypatch):
    model, calib = _prune(tiny_model("llama"), "50%"), _calib()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if "norm" not in n and ".layers." not in n}
    optimizers, seen, lrs = [], {}, []
    real_adamw = torch.optim.AdamW
    monkeypatch.setattr(torch.optim, "AdamW", lambda *a, **k: optimizers.append(real_adamw(*a, **k)) or optimizers[-1])

    def loss_fn(m, ids, index):
        seen.update((n, p.dtype) for n, p in m.named_parameters() if p.requires_grad)
        lrs.append(optimizers[0].param_groups[0]["lr"])
        return causal_lm_loss(m, ids)

    result = retrain(model, LoRAConfig(**{**FAST, "steps": 2}, rank=4), calib, progress=False, loss_fn=loss_fn)
    kinds = {n.rpartition(".")[2] for n in seen}
    assert kinds == {"lora_A", "lora_B", "weight"}
    assert all(n.endswith("norm.weight") for n in seen if n.endswith(".weight"))
    assert all(dtype == torch.float32 for dtype in seen.values())
    # rank 4 x (in + out) for each of the 2 x 7 linears, plus 2 x 2 + 1 norms of 64.
    adapters = 4 * sum(m.in_features + m.out_features for m in _linears(model).values())
    assert result.trainable_params == adapters + 5 * 64 and len(seen) == 2 * 14 + 5
    assert result.trainable_fraction < 0.25
    assert lrs == pytest.approx([1e-2, 0.5e-2])                       # cosine over 2 steps, no warm-up
    state = optimizers[0].state
    assert len(state) == len(seen)                                    # one entry per trained tensor, no more
    assert sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel() for s in state.values()) == 2 * result.trainable_params
    for name, p in model.named_parameters():                          # requires_grad as before (all True)
        assert p.requires_grad, name
        if name in frozen:
            assert torch.equal(p, frozen[name]), name                 # embeddings, lm_head untouched


def test_bfloat16_model_stays_bfloat16_and_its_norms_still_learn():
    """Norms in bfloat16 move in steps of 2^-7 near 1.0; the float32 master copies let 8 steps of
    lr 1e-3 (each below half a step) add up to a change."""
    model, calib = _prune(tiny_model("llama").to(torch.bfloat16), "2:4"), _calib()
    zeros = _zeros(model)
    norm = model.model.layers[0].input_layernorm.weight
    norm_before = norm.detach().clone()
    retrain(model, LoRAConfig(steps=8, batch_size=4, learning_rate=1e-3, warmup_steps=0, schedule="constant"),
            calib, progress=False)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert not torch.equal(norm, norm_before)
    for name, m in _linears(model).items():
        assert torch.equal(m.weight == 0, zeros[name]) and _holds_2_4(m.weight), name


def test_qwen2_trains_the_qkv_biases():
    model, calib = _prune(tiny_model("qwen2"), "50%"), _calib()
    attn = model.model.layers[0].self_attn
    biases = {n: getattr(attn, n).bias.detach().clone() for n in ("q_proj", "k_proj", "v_proj")}
    frozen = retrain(_prune(tiny_model("qwen2"), "50%"), LoRAConfig(**{**FAST, "steps": 3}, train_biases=False),
                     calib, progress=False)
    trained = retrain(model, LoRAConfig(**{**FAST, "steps": 3}), calib, progress=False)
    assert trained.trainable_params - frozen.trainable_params == 2 * (64 + 32 + 32)   # q, k, v biases x 2 layers
    for name, bias in biases.items():
        assert not torch.equal(getattr(attn, name).bias, bias), name
    assert trained.max_mask_deviation == 0.0


def test_time_budget_stops_early_and_still_merges():
    model, calib = _prune(tiny_model("llama"), "50%"), _calib()
    zeros = _zeros(model)
    cfg = LoRAConfig(**{**FAST, "steps": 1000}, max_minutes=1e-6, grad_checkpointing=True)
    result = retrain(model, cfg, calib, progress=False)
    assert result.steps == 1 and result.stopped == "max_minutes" and result.merged
    assert not model.is_activation_checkpointing and not model.training          # both as they were
    assert result.tokens == 4 * 16
    for name, m in _linears(model).items():
        assert type(m) is nn.Linear and torch.equal(m.weight == 0, zeros[name])


def test_same_seed_same_model_and_targets_pick_layers():
    calib = _calib()
    a, b = _prune(tiny_model("llama"), "50%"), _prune(tiny_model("llama"), "50%")
    cfg = LoRAConfig(**{**FAST, "steps": 3}, dropout=0.1, targets=["self_attn.q_proj"])
    ra, rb = retrain(a, cfg, calib, progress=False), retrain(b, cfg, calib, progress=False)
    assert ra.losses == rb.losses and sorted(ra.layers) == ["model.layers.0.self_attn.q_proj",
                                                            "model.layers.1.self_attn.q_proj"]
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name


def test_gradient_accumulation_takes_the_same_steps():
    calib = _calib()
    one, two = _prune(tiny_model("llama"), "50%"), _prune(tiny_model("llama"), "50%")
    r1 = retrain(one, LoRAConfig(**{**FAST, "steps": 3}), calib, progress=False)
    r2 = retrain(two, LoRAConfig(**{**FAST, "steps": 3}, grad_accum=2), calib, progress=False)
    assert r1.losses == pytest.approx(r2.losses, abs=1e-5)
    for p1, p2 in zip(one.parameters(), two.parameters()):
        torch.testing.assert_close(p1, p2, rtol=0, atol=1e-4)


def test_a_failed_run_leaves_the_model_as_it_was():
    model, calib = _prune(tiny_model("llama"), "50%"), _calib()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def loss_fn(m, ids, index):
        calls.append(1)
        return causal_lm_loss(m, ids) * (float("nan") if len(calls) > 2 else 1.0)

    with pytest.raises(ConfigError, match="lower learning_rate"):
        retrain(model, LoRAConfig(**FAST), calib, progress=False, loss_fn=loss_fn)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name]) and p.requires_grad, name


def test_packed_bases_take_adapters_but_do_not_merge():
    from compress.quant.linear import QuantLinear
    base = QuantLinear(32, 16, bits=4, group_size=32, symmetric=True)
    m = LoRALinear(base, 4, 8.0)
    with torch.no_grad():
        m.lora_B.fill_(0.1)
    x = torch.randn(3, 32)
    torch.testing.assert_close(m(x), base(x) + m.scale * x @ m.lora_A.T @ m.lora_B.T)
    with pytest.raises(ConfigError, match="merge=False"):
        merge_lora(m)


@pytest.mark.parametrize("bad, message", [
    (dict(rank=0), "rank must be a positive"),
    (dict(alpha=0), "alpha must be positive"),
    (dict(dropout=1.0), "dropout"),
    (dict(steps=0), "steps must be"),
    (dict(learning_rate=0), "learning_rate"),
    (dict(schedule="exponential"), "schedule must be one of"),
    (dict(batch_size=6, grad_accum=4), "grad_accum 4 must divide batch_size 6"),
    (dict(max_minutes=0), "max_minutes"),
    (dict(targets=[]), "targets"),
    (dict(keep_mask=False), "mask_during_training"),
    (dict(samples=2), "samples 2 is fewer than batch_size 4"),
])
def test_config_errors_say_what_is_wrong(bad, message):
    with pytest.raises(ConfigError, match=message):
        LoRAConfig(**bad)


def test_config_round_trip_and_data_errors():
    cfg = LoRAConfig(rank=16, targets=["mlp.*"], max_minutes=5)
    assert config_from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown key 'rnak'"):
        config_from_dict({"method": "lora", "rnak": 4})
    model = tiny_model("llama")
    with pytest.raises(ConfigError, match="calib=compress.calibration_data"):
        lora_retrain(model, LoRAConfig())
    with pytest.raises(ConfigError, match="exceeds the 4 calibration samples"):
        retrain(model, LoRAConfig(batch_size=8), _calib(), progress=False)
    with pytest.raises(ConfigError, match="match no linear"):
        retrain(model, LoRAConfig(targets=["nothing_here"]), _calib(), progress=False)
    assert all(type(m) is not LoRALinear for m in model.modules())


def test_learning_rate_schedules():
    cos = LoRAConfig(steps=10, warmup_steps=4)
    assert [lr_factor(s, cos) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, cos) == 1.0 and 0 < lr_factor(9, cos) < 0.1
    lin = LoRAConfig(steps=10, warmup_steps=0, schedule="linear")
    assert lr_factor(5, lin) == 0.5
    assert lr_factor(9, LoRAConfig(steps=10, warmup_steps=0, schedule="constant")) == 1.0
    budget = LoRAConfig(steps=100, warmup_steps=0, schedule="linear", max_minutes=1)
    assert lr_factor(10, budget, elapsed=0.5) == 0.5 and lr_factor(60, budget, elapsed=0.5) == pytest.approx(0.4)
    assert lr_factor(10, budget, elapsed=1.2) == 0.0                   # time is up: the decay has ended
