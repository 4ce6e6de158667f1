"""Data-parallel calibration (compress.distributed): N gloo ranks give one process's checkpoint bit for
bit, the layout's arithmetic, and the refusals."""

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from compress.distributed import DataParallel, default_shards, merge_stats
from compress.engine import engine_context
from compress.errors import ConfigError
from compress.stats import HessianStats

from conftest import tiny_model


def _cli(*args, timeout=300):
    # One thread per process: CPU BLAS splits its sums by thread count, so bit-equality holds between runs
    # with equal threads per rank (docs/distributed.md); --workers 2 gives each rank 1 of this CI's 2 cores.
    return subprocess.run([sys.executable, "-m", "compress", "-q", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def _tensors(path):
    return load_file(str(next(path.glob("*.safetensors"))))


@pytest.mark.parametrize("method", ["gptq", pytest.param("sparsegpt", marks=pytest.mark.slow)])
def test_two_gloo_ranks_equal_one_process_bit_for_bit(tmp_path, base, text_file, method):
    verb = ["quantize", "--method", "gptq", "--group-size", "32"] if method == "gptq" else \
        ["prune", "--method", "sparsegpt", "--sparsity", "0.5"]
    common = [verb[0], base, *verb[1:], "--calib", text_file, "--calib-samples", 8, "--seqlen", 32]
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run = _cli(*common, "--workers", workers, "--output", out)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[workers] = _tensors(out)
    assert outs[1].keys() == outs[2].keys()
    for name in outs[1]:
        assert torch.equal(outs[1][name], outs[2][name]), name
    # Negative control: the compression really happened (not a copy of the dense weights).
    dense = _tensors(base)
    changed = [n for n in dense if n in outs[1] and not torch.equal(dense[n], outs[1][n])]
    assert changed or any(n.endswith("weight_packed") for n in outs[1])


def test_one_process_reduction_layout_runs_in_process(calib_ids):
    """--workers 1: the shard-tree reduction in one process; close to (not necessarily equal to) the
    plain sequential accumulation, and every shard count gives a valid GPTQ solve."""
    from compress.data import CalibrationData
    from compress import GPTQConfig, quantize
    calib = CalibrationData(calib_ids, "test", 0)
    plain, layout = tiny_model("llama"), tiny_model("llama")
    quantize(plain, GPTQConfig(bits=4, group_size=32), calib=calib, device="cpu", progress=False)
    with engine_context(parallel=DataParallel(0, 1, shards=4)):
        quantize(layout, GPTQConfig(bits=4, group_size=32), calib=calib, device="cpu", progress=False)
    a, b = plain.state_dict(), layout.state_dict()
    diff = max(float((a[k].float() - b[k].float()).abs().max()) for k in a if k.endswith("weight_scale"))
    assert diff < 0.05


def test_layout_arithmetic_and_refusals():
    dp = DataParallel(1, 2, shards=8)
    assert list(dp.owned()) == [4, 5, 6, 7]
    assert dp.shard_bounds(10) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 7), (7, 8), (8, 9), (9, 10)]
    assert default_shards(1) == 8 and default_shards(3) == 24 and default_shards(16) == 16
    with pytest.raises(ConfigError, match="cannot split 6 calibration shards"):
        DataParallel(0, 4, shards=6)
    with pytest.raises(ConfigError, match="use at least 8 samples"):
        dp.shard_bounds(5)


def test_reduce_shards_tree_is_the_same_for_any_rank_block():
    """World 1 sums leaves on the balanced tree ((0+1)+(2+3)); a sequential sum can differ in the last bit."""
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(64, 16, generator=g) * 10 ** torch.randint(-3, 4, (1,), generator=g) for _ in range(4)]

    def leaf(s):
        st = HessianStats(16)
        st.add(xs[s])
        return [st]

    total = DataParallel(0, 1, shards=4).reduce_shards(leaf, lambda: [HessianStats(16)])[0]
    a, b, c, d = (leaf(s)[0] for s in range(4))
    tree = merge_stats(merge_stats(a, b), merge_stats(c, d))
    assert torch.equal(total.xtx, tree.xtx) and total.tokens == 256
    assert torch.equal(total.amax, torch.stack([x.abs().max() for x in xs]).max())


def test_stats_without_a_reduce_table_are_refused():
    class Opaque:
        pass
    with pytest.raises(ConfigError, match="Opaque statistics do not declare"):
        merge_stats(Opaque(), Opaque())


def test_awq_is_refused_under_data_parallel(base, text_file, tmp_path):
    run = _cli("quantize", base, "--method", "awq", "--calib", text_file, "--calib-samples", 8, "--seqlen", 32,
               "--workers", 1, "--output", tmp_path / "o")
    assert run.returncode == 2
    assert "without --workers" in run.stderr


def test_bad_worker_counts(base, text_file, tmp_path):
    run = _cli("quantize", base, "--calib", text_file, "--workers", 0, "--output", tmp_path / "o")
    assert run.returncode == 2 and "--workers 0" in run.stderr
    run = _cli("quantize", base, "--group-size", 32, "--calib", text_file, "--calib-samples", 8, "--seqlen", 32,
               "--workers", 1, "--shards", 16, "--output", tmp_path / "o")
    assert run.returncode == 2 and "use at least 16 samples" in run.stderr


@pytest.mark.slow
def test_two_ranks_spread_an_moe_layers_expert_solves_and_equal_one_process(tmp_path, tokenizer, text_file):
    """Experts of one block are solved in waves; the ranks take turns solving them and broadcast."""
    from test_moe import tiny_moe
    base = tmp_path / "moe"
    tiny_moe("qwen3_moe").save_pretrained(base)
    tokenizer.save_pretrained(base)
    outs = {}
    for workers in (1, 2):
        out = tmp_path / f"w{workers}"
        run = _cli("quantize", base, "--method", "gptq", "--group-size", 16, "--calib", text_file,
                   "--calib-samples", 8, "--seqlen", 32, "--batch-size", 2, "--workers", workers, "--output", out)
        assert run.returncode == 0, run.stderr[-3000:]
        outs[workers] = _tensors(out)
    assert any(".experts." in n for n in outs[1])
    for name in outs[1]:
        assert torch.equal(outs[1][name], outs[2][name]), name
