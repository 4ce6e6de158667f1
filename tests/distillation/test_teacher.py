"""The teacher's side of distillation: cached targets are exactly what the teacher computes, survive
a save / load round trip, refuse (by name) windows, k, temperatures or layers they were not made for,
and a damaged cache file says to delete it; the live teacher serves the same targets."""

import pytest
import torch
from safetensors.torch import save_file

import compress
from compress.distillation.teacher import (HIDDEN_DTYPE, LiveTeacher, TeacherTargets, compute_targets, resolve_layers,
                                      windows_key)
from compress.errors import CheckpointError, ConfigError

from conftest import VOCAB, tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")




def _ids(seed: int = 1, samples: int = 6, seqlen: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (samples, seqlen), generator=torch.Generator().manual_seed(seed))


def _teacher(arch: str = "llama"):
    model = tiny_model(arch)
    with torch.no_grad():
        model.model.norm.weight.mul_(20.0)                 # sharp logits: top-k differs from the whole vocabulary
    return model


def _cfg(**kw) -> compress.DistillConfig:
    return compress.DistillConfig(**{"top_k": 16, "temperature": 2.0, "hidden": 1.0, "hidden_layers": [-1], **kw})


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_targets_are_the_teachers_top_k_logsumexp_and_hidden_states(arch):
    teacher, ids = _teacher(arch), _ids()
    teacher.train()
    targets = compute_targets(teacher, ids, _cfg(), device=CPU, batch_size=4, progress=False)   # 4 + a short 2
    assert teacher.training                                                      # its mode as it was
    with torch.no_grad():
        out = teacher.eval()(ids, output_hidden_states=True)
    logits = out.logits                                                          # (6, 16, V)
    assert targets.values.shape == targets.indices.shape == (6, 16, 16)
    assert targets.values.dtype == torch.float32 and targets.indices.dtype == torch.int32
    torch.testing.assert_close(targets.values, logits.topk(16, dim=-1).values, rtol=0, atol=1e-5)
    picked = logits.gather(-1, targets.indices.long())                          # the ids point at those values
    torch.testing.assert_close(picked, targets.values, rtol=0, atol=1e-5)
    assert bool((targets.values[..., :-1] >= targets.values[..., 1:]).all())    # sorted, largest first
    torch.testing.assert_close(targets.logsumexp, torch.logsumexp(logits / 2.0, dim=-1), rtol=0, atol=1e-5)
    assert set(targets.hidden) == {1} and targets.hidden[1].dtype == HIDDEN_DTYPE
    torch.testing.assert_close(targets.hidden[1], out.hidden_states[2].to(HIDDEN_DTYPE), rtol=0, atol=0.02)
    assert targets.temperature == 2.0 and targets.key == windows_key(ids) and targets.k is None
    assert targets.nbytes == 6 * 16 * (16 * 4 + 16 * 4 + 4 + 64 * 2)
    # Negative control: the top 16 are not the whole distribution, the rest bucket has real mass.
    rest = 1 - (targets.values / 2.0 - targets.logsumexp[..., None]).exp().sum(-1)
    assert float(rest.mean()) > 0.05


def test_only_what_the_config_needs_is_computed():
    teacher, ids = _teacher(), _ids()
    hidden_only = compute_targets(teacher, ids, _cfg(kl=0.0, hidden_layers=None), device=CPU, progress=False)
    assert hidden_only.values is hidden_only.indices is hidden_only.logsumexp is None
    assert set(hidden_only.hidden) == {0, 1}                                      # null = every layer
    logits_only = compute_targets(teacher, ids, _cfg(hidden=0.0), device=CPU, progress=False)
    assert logits_only.hidden == {} and logits_only.values.shape[-1] == 16


def test_batch_picks_the_rows_and_serves_the_first_k():
    teacher, ids = _teacher(), _ids()
    targets = compute_targets(teacher, ids, _cfg(top_k=32), device=CPU, progress=False)
    index = torch.tensor([4, 1])
    full = targets.batch(index, ids[index])
    assert full.values.shape == (2, 16, 32)
    assert torch.equal(full.values, targets.values[index]) and torch.equal(full.hidden[1], targets.hidden[1][index])
    sliced = TeacherTargets(targets.key, targets.values, targets.indices, targets.logsumexp, targets.hidden,
                            targets.temperature, k=8).batch(index, ids[index])
    assert sliced.values.shape == sliced.indices.shape == (2, 16, 8)
    assert torch.equal(sliced.values, targets.values[index, :, :8])
    assert torch.equal(sliced.indices, targets.indices[index, :, :8])
    assert torch.equal(sliced.logsumexp, targets.logsumexp[index])              # the whole vocabulary's, still
    # The first 8 of the cached 32 are what a top-8 pass computes.
    eight = compute_targets(teacher, ids, _cfg(top_k=8), device=CPU, progress=False).batch(index, ids[index])
    assert torch.equal(sliced.values, eight.values) and torch.equal(sliced.indices, eight.indices)


def test_the_live_teacher_serves_what_the_cache_holds():
    teacher, ids = _teacher(), _ids()
    cfg = _cfg()
    cached = compute_targets(teacher, ids, cfg, device=CPU, progress=False)
    live = LiveTeacher(teacher, cfg, CPU)
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    index = torch.tensor([3, 0, 5])
    a, b = live.batch(index, ids[index]), cached.batch(index, ids[index])
    assert a.logits is None and live.layers == [1]
    torch.testing.assert_close(a.values, b.values, rtol=0, atol=1e-5)
    assert torch.equal(a.indices, b.indices)
    torch.testing.assert_close(a.logsumexp, b.logsumexp, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.hidden[1].to(HIDDEN_DTYPE), b.hidden[1], rtol=0, atol=0.02)
    # Full vocabulary: top_k null, and reverse KL (which needs it whatever top_k says).
    for full_cfg in (_cfg(top_k=None, teacher="model"), _cfg(top_k=None, teacher="model", kl=0.0, reverse_kl=1.0)):
        full = LiveTeacher(teacher, full_cfg, CPU).batch(index, ids[index])
        assert full.values is None and full.logits.shape == (3, 16, VOCAB)
    live.close()


def test_save_and_load_round_trip(tmp_path):
    teacher, ids = _teacher(), _ids()
    targets = compute_targets(teacher, ids, _cfg(hidden_layers=[0, 1], temperature=1.5), device=CPU, progress=False)
    path = targets.save(tmp_path / "sub" / "teacher.safetensors")
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["teacher.safetensors"]  # no .tmp
    loaded = TeacherTargets.load(path)
    assert loaded.key == targets.key and loaded.temperature == 1.5 and loaded.k is None
    for name in ("values", "indices", "logsumexp"):
        a, b = getattr(loaded, name), getattr(targets, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert sorted(loaded.hidden) == [0, 1]
    assert all(loaded.hidden[i].dtype == HIDDEN_DTYPE and torch.equal(loaded.hidden[i], targets.hidden[i])
               for i in (0, 1))
    loaded.check(_cfg(hidden_layers=[0, 1], temperature=1.5), ids, [0, 1])      # still fits its run
    # Hidden-only targets (no logits) round-trip too.
    hidden_only = compute_targets(teacher, ids, _cfg(kl=0.0), device=CPU, progress=False)
    again = TeacherTargets.load(hidden_only.save(tmp_path / "h.safetensors"))
    assert again.values is None and again.logsumexp is None and torch.equal(again.hidden[1], hidden_only.hidden[1])


@pytest.mark.parametrize("change, layers, message", [
    (dict(ids=_ids(seed=2)), [1], r"they were computed on other training windows"),
    (dict(top_k=32), [1], r"they hold 16 logits per token, top_k is 32"),
    (dict(temperature=1.0), [1], r"their temperature is 2, the config's 1"),
    (dict(hidden_layers=[0, 1]), [0, 1], r"they hold no hidden states of layers \[0\]"),
    (dict(ids=_ids(seed=2), temperature=3.0), [1],
     r"they were computed on other training windows; their temperature is 2, the config's 3"),   # all problems
])
def test_check_refuses_targets_made_for_another_run(change, layers, message):
    teacher, ids = _teacher(), _ids()
    targets = compute_targets(teacher, ids, _cfg(), device=CPU, progress=False)
    targets.check(_cfg(), ids, [1])                                              # negative control: it fits
    targets.check(_cfg(top_k=8), ids, [1])                                       # fewer logits are served
    targets.check(_cfg(kl=0.0, temperature=5.0), ids, [1])                       # no logits used: T is moot
    change = dict(change)
    other_ids = change.pop("ids", ids)
    with pytest.raises(ConfigError, match=rf"do not fit this distillation: {message}.*compute them again"):
        targets.check(_cfg(**change), other_ids, layers)


def test_a_damaged_or_foreign_cache_file_says_to_delete_it(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                   dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(CheckpointError, match=r"junk.safetensors: not a readable teacher cache.*delete it"):
        TeacherTargets.load(junk)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"values": torch.zeros(2, 3)}, str(foreign), metadata={"format": "something-else"})
    with pytest.raises(CheckpointError, match=r"foreign.safetensors: not a teacher cache of version 1.*delete it"):
        TeacherTargets.load(foreign)
    newer = tmp_path / "newer.safetensors"
    save_file({"values": torch.zeros(2, 3)}, str(newer), metadata={"format": "compress-teacher-cache", "version": "2",
                                                                    "key": "x", "temperature": "1.0"})
    with pytest.raises(CheckpointError, match=r"not a teacher cache of version 1 \(metadata .*'version': '2'"):
        TeacherTargets.load(newer)
    # Distillation given the damaged file's path stops with the same error, before any training.
    student = tiny_model("llama")
    with pytest.raises(CheckpointError, match="delete it"):
        compress.distill(student, compress.DistillConfig(steps=1), _ids(), teacher=junk, progress=False)


def test_layer_indices_and_window_keys():
    assert resolve_layers(None, 3) == [0, 1, 2]
    assert resolve_layers([-1, 0, 2, -3], 3) == [0, 2]                          # negatives from the end, deduplicated
    for bad in (3, -4):
        with pytest.raises(ConfigError, match=rf"hidden_layers entry {bad} is out of range for a model with 3"):
            resolve_layers([bad], 3)
    ids = _ids()
    assert windows_key(ids) == windows_key(ids.clone()) == windows_key(ids.to(torch.int32))
    changed = ids.clone()
    changed[5, 15] = (changed[5, 15] + 1) % VOCAB
    assert windows_key(changed) != windows_key(ids)                              # one token differs
    assert windows_key(ids[:, :8]) != windows_key(ids)


def test_window_keys_tell_reshaped_windows_apart():
    teacher, ids = _teacher(), _ids()
    targets = compute_targets(teacher, ids, _cfg(), device=CPU, progress=False)
    with pytest.raises(ConfigError, match="other training windows"):
        targets.check(_cfg(), ids.reshape(12, 8), [1])
