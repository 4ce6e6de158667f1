"""Kernel-config choice: the shape heuristic, the candidate sets, the autotune cache."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from compress.kernels import tuning
from compress.kernels.tuning import Autotuner, KernelConfig


def test_heuristic_follows_the_batch():
    assert tuning.heuristic_config(1, 4096, 4096, 128).kind == "splitk"
    assert tuning.heuristic_config(1, 4096, 4096, 128).block_m == 1
    assert tuning.heuristic_config(16, 4096, 4096, 128).block_m == 16
    assert tuning.heuristic_config(64, 4096, 4096, 128).kind == "tiled"
    assert tuning.heuristic_config(512, 4096, 4096, 128).kind == "dense"


def test_heuristic_splits_k_to_fill_the_gpu_and_keeps_tiles_inside_groups():
    one_token = tuning.heuristic_config(1, 4096, 4096, 128, sm_count=132)
    assert one_token.split_k > 1 and (4096 // one_token.block_n) * one_token.split_k >= 132
    assert 128 % one_token.block_k == 0
    assert 64 % tuning.heuristic_config(1, 576, 576, 64).block_k == 0
    # A short K keeps at least two tiles per slice.
    assert tuning.heuristic_config(1, 4096, 256, 128).split_k == 1


def test_candidates_always_include_the_dense_fallback_and_fit_the_batch():
    for m in (1, 4, 16, 64, 256, 2048):
        cands = tuning.candidates(m, 128)
        assert cands[-1].kind == "dense"
        splitk = [c for c in cands if c.kind == "splitk"]
        assert bool(splitk) == (m <= tuning.SMALL_M)
        assert all((c.block_m == 1) == (m == 1) for c in splitk)
        # inside one group, or (one token) exactly 2 or 4 whole groups
        assert all(128 % c.block_k == 0 or (m == 1 and c.block_k // 128 in (2, 4) and c.block_k % 128 == 0)
                   for c in cands if c.kind != "dense")
    assert any(c.block_k == 512 for c in tuning.candidates(1, 128))
    assert not [c for c in tuning.candidates(64, 128) if c.kind == "splitk"]


def test_every_config_has_a_unique_name_that_round_trips():
    names = [c.name for c in tuning.all_configs()]
    assert len(names) == len(set(names))
    assert all(KernelConfig.from_name(n).name == n for n in names)
    with pytest.raises(KeyError):
        KernelConfig.from_name("splitk_m3n7")


def test_m_buckets():
    assert [tuning.m_bucket(m) for m in (1, 2, 3, 16, 17, 100, 10_000)] == [1, 2, 4, 16, 32, 128, 4096]


def test_autotuner_keeps_the_fastest_and_persists_it(tmp_path):
    cands = tuning.candidates(1, 128)
    fastest = cands[3]
    tuner = Autotuner("GPU X-sm90-triton9", tmp_path)
    times = {c: (0.5 if c == fastest else 1.0 + i) for i, c in enumerate(cands)}
    ran = []
    best = tuner.tune("k1", lambda cfg: ran.append(cfg), cands, lambda fn: (fn(), times[ran[-1]])[1])
    assert best == fastest and len(ran) == len(cands)
    data = json.loads(tuner.path.read_text())
    assert data == {"device": "GPU X-sm90-triton9", "configs": {"k1": fastest.name}}
    again = Autotuner("GPU X-sm90-triton9", tmp_path)
    assert again.lookup("k1") == fastest and again.lookup("k2") is None
    # Another device (or Triton version) never reuses these timings.
    assert Autotuner("GPU Y-sm80-triton9", tmp_path).lookup("k1") is None


def test_autotuner_skips_configs_that_fail_and_says_when_none_ran(tmp_path):
    cands = tuning.candidates(1, 128)[:3]
    tuner = Autotuner("dev", tmp_path)

    def bench(fn):
        cfg = fn()
        if cfg != cands[1]:
            raise RuntimeError("out of shared memory")
        return 1.0

    assert tuner.tune("k", lambda cfg: cfg, cands, bench) == cands[1]
    with pytest.raises(RuntimeError, match="no kernel config ran for k2"):
        tuner.tune("k2", lambda cfg: cfg, cands, lambda fn: 1 / 0)


def test_a_corrupt_or_foreign_cache_is_ignored_with_a_warning(tmp_path, caplog):
    tuner = Autotuner("dev", tmp_path)
    tuner.path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        assert Autotuner("dev", tmp_path).table == {}
    assert "unreadable autotune cache" in caplog.text
    tuner.path.write_text(json.dumps({"device": "dev", "configs": {"k": "no-such-config"}}))
    assert Autotuner("dev", tmp_path).lookup("k") is None


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("COMPRESS_CACHE_DIR", str(tmp_path))
    assert Autotuner("NVIDIA H100 80GB HBM3-sm90").path == tmp_path / "autotune-NVIDIA_H100_80GB_HBM3-sm90.json"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph timing needs a GPU")
def test_graph_bench_cuda_times_work_not_launches():
    """graph_bench ranks by GPU work: four times the bytes copied takes clearly longer, and a call of
    three tiny kernels is not charged three CPU launch gaps (it is replayed from a graph)."""
    small = torch.empty(8 << 20, dtype=torch.float32, device="cuda")
    large = torch.empty(32 << 20, dtype=torch.float32, device="cuda")
    tiny = torch.empty(1024, device="cuda")
    t_small = tuning.graph_bench(lambda: small.mul_(1.0))
    t_large = tuning.graph_bench(lambda: large.mul_(1.0))
    assert t_large > 2.5 * t_small > 0
    t_three = tuning.graph_bench(lambda: (tiny.zero_(), tiny.add_(1.0), tiny.mul_(2.0)))
    assert t_three < 0.02, f"three tiny kernels under a graph took {t_three * 1e3:.1f} us"


def test_graph_bench_is_the_autotuners_clock():
    """pick_config times candidates with graph_bench (not single launches: see its docstring)."""
    import importlib
    import inspect
    module = importlib.import_module("compress.kernels.dequant_linear")
    src = inspect.getsource(module.pick_config)
    assert "tuning.graph_bench" in src and "do_bench" not in src
