import json
import subprocess
import sys

import pytest
import torch

import compress
from compress.cli import main


def _quantize(base, text_file, out, *extra):
    return main(["-q", "quantize", str(base), "--method", "gptq", "--bits", "4", "--group-size", "32",
                 "--calib", str(text_file), "--calib-samples", "4", "--seqlen", "32", "--output", str(out), *extra])


def test_quantize_then_inspect_then_eval(base, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(base, text_file, out, "--eval", str(text_file), "--max-windows", "2") == 0
    table = capsys.readouterr().out
    assert "gptq w4g32" in table and (out / "report.json").exists()

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pack-quantized" in text and "int4 group 32 symmetric" in text and "MiB" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["quantized_modules"] == 14 and info["schemes"][0]["bits"] == 4

    assert main(["-q", "eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "3",
                 "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert {"perplexity", "tokens", "seconds"} <= set(result) and result["tokens"] == 3 * 31


def test_errors_exit_2_with_the_message(base, text_file, tmp_path, capsys):
    assert _quantize(base, text_file, tmp_path / "q", "--group-size", "128") == 2
    assert "group_size 128 does not divide in_features 64" in capsys.readouterr().err
    assert main(["quantize", str(base), "--output", str(tmp_path / "x")]) == 2
    assert "--calib" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing"), "--data", str(text_file)]) == 2
    assert "no such file or directory" in capsys.readouterr().err
    assert main(["inspect", str(tmp_path)]) == 2


def test_existing_output_needs_overwrite(base, text_file, tmp_path, capsys):
    out = tmp_path / "q"
    assert _quantize(base, text_file, out) == 0
    assert _quantize(base, text_file, out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert _quantize(base, text_file, out, "--overwrite") == 0


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "compress", "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "quantize" in done.stdout and "inspect" in done.stdout


def _record_backends(monkeypatch, module):
    """Replace ``module.evaluate`` by a stub that records the kernel backends of the model it gets
    (no forward runs, so a backend this machine cannot execute is fine)."""
    from compress.evaluation import EvalResult
    from compress.quant.linear import QuantLinear
    seen = []

    def fake_evaluate(model, tok, data, **kwargs):
        seen.append({m.backend for m in model.modules() if isinstance(m, QuantLinear)})
        return EvalResult(perplexity=1.0, nll=0.0, tokens=1, windows=1, seqlen=8, seconds=0.0, source=str(data))
    monkeypatch.setattr(module, "evaluate", fake_evaluate)
    return seen


def test_eval_backend_is_applied(base, text_file, tmp_path, monkeypatch):
    import compress.cli
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--group-size", "32", "--output", str(out)]) == 0
    seen = _record_backends(monkeypatch, compress.cli)
    for backend in ("torch", "triton", "auto"):
        assert main(["-q", "eval", str(out), "--data", str(text_file), "--backend", backend, "--json"]) == 0
    assert seen == [{"torch"}, {"triton"}, {"auto"}]


def test_run_backend_overrides_the_recipe(base, text_file, tmp_path, monkeypatch):
    import yaml

    import compress.recipe
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "version": 1, "model": str(base), "backend": "torch",
        "passes": [{"method": "rtn", "bits": 4, "group_size": 32}],
        "evaluation": {"data": str(text_file), "seqlen": 32, "max_windows": 1, "baseline": False},
        "export": {"output": str(tmp_path / "out"), "verify": True}}))
    seen = _record_backends(monkeypatch, compress.recipe)
    assert main(["-q", "run", str(recipe)]) == 0
    assert seen == [{"torch"}, {"torch"}]                      # after the pass, and on the verify reload
    seen.clear()
    assert main(["-q", "run", str(recipe), "--overwrite", "--backend", "triton"]) == 0
    assert seen == [{"triton"}, {"triton"}]
    with pytest.raises(SystemExit) as done:
        main(["run", str(recipe), "--backend", "cuda"])
    assert done.value.code == 2


@pytest.mark.parametrize("scheme,method", [("nvfp4a16", "rtn"), ("nvfp4", "gptq"), ("mxfp4", "gptq")])
def test_fp4_schemes_quantize_inspect_and_eval(base, text_file, tmp_path, capsys, scheme, method):
    out = tmp_path / scheme
    args = ["-q", "quantize", str(base), "--method", method, "--scheme", scheme, "--output", str(out)]
    if method == "gptq" or scheme == "nvfp4":
        args += ["--calib", str(text_file), "--calib-samples", "4", "--seqlen", "32"]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    fmt = "mxfp4-pack-quantized" if scheme == "mxfp4" else "nvfp4-pack-quantized"
    assert f"scheme     {fmt}: float4 e2m1" in text and ("W4A4" in text) == (scheme == "nvfp4")
    assert main(["-q", "eval", str(out), "--data", str(text_file), "--seqlen", "32", "--max-windows", "2",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["perplexity"] > 1


def test_w4a4_without_calibration_exits_2(base, tmp_path, capsys):
    assert main(["quantize", str(base), "--method", "rtn", "--scheme", "nvfp4", "--output", str(tmp_path / "x")]) == 2
    assert "--scheme nvfp4 (W4A4 activation scales) needs --calib" in capsys.readouterr().err
    assert main(["quantize", str(base), "--method", "rtn", "--scheme", "nvfp4a16", "--bits", "8",
                 "--output", str(tmp_path / "y")]) == 2
    assert "bits must be 4" in capsys.readouterr().err


def test_prune_wanda_2of4_with_lora_exports_compact_and_reloads(base, text_file, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["-q", "prune", str(base), "--method", "wanda", "--pattern", "2:4", "--calib", str(text_file),
                 "--calib-samples", "4", "--seqlen", "32", "--lora-steps", "2", "--train-samples", "4",
                 "--eval", str(text_file), "--max-windows", "2", "--layout", "compact", "--output", str(out)]) == 0
    table = capsys.readouterr().out
    assert "wanda 2:4" in table and "lora" in table
    report = json.loads((out / "report.json").read_text())
    stages = {s["name"].split()[0]: s for s in report["stages"]}
    assert stages["lora"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert stages["lora"]["detail"]["result"]["steps"] == 2
    assert main(["inspect", str(out)]) == 0
    assert "2:4 in 14 modules" in capsys.readouterr().out
    model, _ = compress.load_model(out)
    assert type(model.model.layers[0].mlp.down_proj).__name__ == "Sparse24Linear"


def test_prune_structured_and_errors(base, text_file, tmp_path, capsys):
    out = tmp_path / "narrow"
    assert main(["-q", "prune", str(base), "--method", "structured", "--ratio", "0.2", "--importance", "weight",
                 "--output", str(out)]) == 0
    from transformers import AutoModelForCausalLM
    assert AutoModelForCausalLM.from_pretrained(out).config.intermediate_size == 128     # 160 -> multiple of 128
    assert main(["prune", str(base), "--method", "wanda", "--output", str(tmp_path / "x")]) == 2
    assert "need(s) --calib" in capsys.readouterr().err
    assert main(["prune", str(base), "--method", "wanda", "--bits", "4", "--calib", str(text_file),
                 "--output", str(tmp_path / "y")]) == 2
    assert "needs --method sparsegpt" in capsys.readouterr().err


def _one_line_error(capsys, *parts) -> str:
    """The one line of compress's own on the captured stderr (transformers' loading bars aside), with
    no traceback, holding every one of ``parts``."""
    err = capsys.readouterr().err
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.startswith("compress ")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert all(p in lines[0] for p in parts), lines[0]
    return lines[0]


@pytest.mark.parametrize("bad", ["0", "-1"])
def test_group_size_zero_or_negative_is_refused_before_writing(base, tmp_path, capsys, bad):
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--group-size", bad, "--output", str(out)]) == 2
    _one_line_error(capsys, f"--group-size {bad}: a group size is a positive number", "--group-size channel")
    assert main(["-q", "prune", str(base), "--method", "sparsegpt", "--bits", "4", "--group-size", bad,
                 "--output", str(out)]) == 2
    _one_line_error(capsys, f"--group-size {bad}")
    assert not out.exists()
    # Negative control: 'channel' is the spelling of one scale per output channel.
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--group-size", "channel", "--output", str(out)]) == 0
    assert "channel" in json.dumps(json.loads((out / "config.json").read_text())["quantization_config"])


def test_fp4_scheme_refuses_a_group_size_other_than_its_block(base, tmp_path, capsys):
    out = tmp_path / "q"
    for scheme, given, block in (("mxfp4", "16", 32), ("nvfp4a16", "32", 16), ("mxfp4", "128", 32),
                                 ("mxfp4", "channel", 32)):
        assert main(["-q", "quantize", str(base), "--method", "rtn", "--scheme", scheme, "--group-size", given,
                     "--output", str(out)]) == 2
        _one_line_error(capsys, f"--group-size {given} does not apply to --scheme {scheme}: its block is fixed at "
                                f"{block} inputs; drop --group-size")
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--scheme", "mxfp4", "--set", "group_size=16",
                 "--output", str(out)]) == 2
    _one_line_error(capsys, "scheme 'mxfp4' stores fixed blocks of 32 inputs; group_size 16 does not apply")
    assert not out.exists()
    # Negative control: the block itself, or no --group-size at all, quantizes.
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--scheme", "mxfp4", "--group-size", "32",
                 "--output", str(out)]) == 0
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--scheme", "mxfp4", "--output", str(out),
                 "--overwrite"]) == 0


def test_binary_calibration_file_is_refused_before_writing(base, tmp_path, capsys):
    binary = tmp_path / "calib.txt"
    binary.write_bytes(bytes(range(256)) * 64)
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "gptq", "--group-size", "32", "--calib", str(binary),
                 "--calib-samples", "4", "--seqlen", "32", "--output", str(out)]) == 2
    _one_line_error(capsys, f"{binary} is a binary file, not text", "give a UTF-8 text file")
    assert not out.exists() and not out.with_name("q.work").exists()
    assert main(["-q", "eval", str(base), "--data", str(binary), "--seqlen", "32"]) == 2
    _one_line_error(capsys, f"{binary} is a binary file")


def test_non_finite_weights_are_refused_before_writing(tmp_path, tokenizer, capsys):
    from conftest import tiny_model
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, :2] = float("inf")
    base = tmp_path / "broken"
    model.save_pretrained(base)
    tokenizer.save_pretrained(base)
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--group-size", "32", "--output", str(out)]) == 2
    _one_line_error(capsys, "model.layers.1.mlp.up_proj.weight has 2 NaN/inf values; the checkpoint is corrupt")
    assert not out.exists() and not out.with_name("q.work").exists()
    assert main(["-q", "eval", str(base), "--data", str(tmp_path / "none.txt")]) == 2   # weights first, then data
    _one_line_error(capsys, "model.layers.1.mlp.up_proj.weight has 2 NaN/inf values")


@pytest.mark.parametrize("flag", ["--max-windows", "--batch-size"])
def test_eval_counts_below_one_are_refused(base, text_file, tmp_path, capsys, flag):
    assert main(["-q", "eval", str(base), "--data", str(text_file), "--seqlen", "32", flag, "0"]) == 2
    _one_line_error(capsys, f"compress eval: error: {flag} 0: must be at least 1; omit {flag}")
    out = tmp_path / "q"
    assert main(["-q", "quantize", str(base), "--method", "rtn", "--eval", str(text_file), flag, "-1",
                 "--output", str(out)]) == 2
    _one_line_error(capsys, f"{flag} -1: must be at least 1")
    assert not out.exists()


def test_cuda_device_without_cuda_is_refused_in_one_line(base, text_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "q"
    line = "--device cuda: torch sees no CUDA device on this machine; use --device cpu or omit --device"
    for argv in (["quantize", str(base), "--method", "rtn", "--output", str(out)],
                 ["prune", str(base), "--method", "magnitude", "--output", str(out)],
                 ["eval", str(base), "--data", str(text_file)]):
        assert main(["-q", *argv, "--device", "cuda"]) == 2
        _one_line_error(capsys, f"compress {argv[0]}: error: {line}")
    assert not out.exists()


def _interrupt(monkeypatch):
    import compress.cli

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(compress.cli, "run_recipe", ctrl_c)


def test_ctrl_c_exits_130_in_one_line_and_leaves_the_output_alone(base, tmp_path, capsys, monkeypatch):
    out = tmp_path / "q"
    argv = ["-q", "quantize", str(base), "--method", "rtn", "--group-size", "32", "--output", str(out)]
    _interrupt(monkeypatch)
    assert main(argv) == 130
    _one_line_error(capsys, f"compress quantize: interrupted; nothing was written to {out}")
    assert not out.exists()

    monkeypatch.undo()
    assert main(argv) == 0                                                 # a real checkpoint, then Ctrl-C over it
    capsys.readouterr()
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _interrupt(monkeypatch)
    assert main([*argv, "--overwrite"]) == 130
    _one_line_error(capsys, f"compress quantize: interrupted; {out} was left as it was")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["-q", "prune", str(base), "--method", "magnitude", "--output", str(tmp_path / "p")]) == 130
    _one_line_error(capsys, f"compress prune: interrupted; nothing was written to {tmp_path / 'p'}")


def test_ctrl_c_in_run_names_the_recipes_output_and_the_work_directory(base, tmp_path, capsys, monkeypatch):
    import yaml
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"version": 1, "model": str(base),
                                      "passes": [{"method": "rtn", "bits": 4, "group_size": 32}],
                                      "export": {"output": "./out"}}))
    work = tmp_path / "out.work"
    work.mkdir()                                                           # what an interrupted pass leaves
    _interrupt(monkeypatch)
    assert main(["-q", "run", str(recipe)]) == 130
    _one_line_error(capsys, f"compress run: interrupted; nothing was written to {tmp_path / 'out'} (finished "
                            f"passes are kept in {work}: rerun the same command to resume)")
