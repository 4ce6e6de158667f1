"""Low-rank corrections (LoRALinear) exported as a PEFT LoRA adapter beside a standard checkpoint:
our round trip, transformers + PEFT reading the same files, masked adapters merged, and bad input."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM

import compress
from compress.checkpoint import export as export_module
from compress.checkpoint.inspect import format_inspection
from compress.data import CalibrationData
from compress.errors import CheckpointError
from compress.modeling import find_decoder_layers, set_module
from compress.lora.adapters import LoRALinear, sparsity_mask
from compress.quant.fp4_linear import FP4Linear
from compress.quant.linear import QuantLinear
from compress.quant.packed import PackedLinear
from compress.report import summarize
from compress.runtime import set_backend
from conftest import tiny_model

RANK, ALPHA = 4, 8.0
Q = "model.layers.0.self_attn.q_proj"
BASES = {"float": nn.Linear, "int4": QuantLinear, "nvfp4a16": FP4Linear}


def _base_model(arch, kind, ids):
    model = tiny_model(arch)
    if kind == "int4":
        compress.quantize(model, compress.RTNConfig(bits=4, group_size=32), progress=False)
    elif kind == "nvfp4a16":
        # .to() would also round the rotary frequencies, which a model loaded in bfloat16 keeps in float32.
        freqs = {n: b for n, b in model.named_buffers() if "inv_freq" in n}
        model = model.to(torch.bfloat16)
        for name, buf in freqs.items():
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, buf)
        compress.quantize(model, compress.RTNConfig(scheme="nvfp4a16"), calib=CalibrationData(ids, "ids", 0),
                          progress=False)
    return model


def _decoder_linears(model):
    _, layers = find_decoder_layers(model)
    inside = {id(m) for m in layers.modules()}
    return [n for n, m in model.named_modules() if id(m) in inside and isinstance(m, (nn.Linear, PackedLinear))]


def _with_adapters(model, rank=RANK, alpha=ALPHA, seed=0, **kw):
    """Wrap every decoder linear in a LoRALinear with a random, nonzero B (a fresh adapter's B is
    zero and would hide a lost adapter)."""
    gen = torch.Generator().manual_seed(seed)
    names = _decoder_linears(model)
    for name in names:
        module = LoRALinear(model.get_submodule(name), rank, alpha, generator=gen, **kw)
        with torch.no_grad():
            module.lora_B.normal_(0.0, 0.05, generator=gen)
        set_module(model, name, module)
    return names


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("kind", sorted(BASES))
def test_round_trip_keeps_the_adapters_and_the_logits(arch, kind, tokenizer, calib_ids, tmp_path):
    model = _base_model(arch, kind, calib_ids)
    without = _logits(model, calib_ids)
    names = _with_adapters(model)
    ours = _logits(model, calib_ids)
    assert (ours - without).abs().max() > 1e-2                   # the adapters really change the model
    path = compress.export(model, tokenizer, tmp_path / "ck")
    assert all(isinstance(model.get_submodule(n), LoRALinear) for n in names)     # the model is left alone

    entry = json.loads((path / "config.json").read_text())["compress_adapter"]
    assert entry == {"format": "peft-lora", "version": 1, "path": "adapter", "modules": sorted(names),
                     "rank": RANK, "alpha": 8}
    main = load_file(str(path / "model.safetensors"))
    assert not any("lora" in k for k in main)                       # the main checkpoint holds the bases
    assert (f"{Q}.weight" if kind == "float" else f"{Q}.weight_packed") in main
    adapter = load_file(str(path / "adapter" / "adapter_model.safetensors"))
    assert adapter[f"base_model.model.{Q}.lora_A.weight"].shape == (RANK, 64)
    assert adapter[f"base_model.model.{Q}.lora_B.weight"].shape == (64, RANK)
    assert len(adapter) == 2 * len(names)

    reloaded, _ = compress.load_model(path)
    for name in names:
        module = reloaded.get_submodule(name)
        assert isinstance(module, LoRALinear) and isinstance(module.base, BASES[kind])
        assert torch.equal(module.lora_B, model.get_submodule(name).lora_B)
    assert torch.equal(_logits(reloaded, calib_ids), ours)


@pytest.mark.parametrize("kind", ["float", "int4"])
def test_transformers_and_peft_load_the_export_like_our_runtime(kind, tokenizer, calib_ids, tmp_path):
    peft = pytest.importorskip("peft")
    model = _base_model("llama", kind, calib_ids)
    names = _with_adapters(model)
    path = compress.export(model, tokenizer, tmp_path / "ck")
    ours = _logits(model, calib_ids)

    config = peft.LoraConfig.from_pretrained(str(path / "adapter"))
    assert (config.r, config.lora_alpha, sorted(config.target_modules)) == (RANK, 8, sorted(names))
    kwargs = {}
    if kind == "int4":
        # transformers 5.23 + compressed-tensors 0.20 keep pack-quantized Linears without a `weight`
        # until their first forward, and PEFT 0.21 reads `weight` when it wraps them; dequantize=True
        # gives PEFT dense Linears (the same values, decompressed at load).
        from transformers import CompressedTensorsConfig
        kwargs["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    theirs = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(path, **kwargs),
                                            str(path / "adapter"))
    wrapped = [n for n, m in theirs.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]
    assert sorted(n.removeprefix("base_model.model.") for n in wrapped) == sorted(names)
    torch.testing.assert_close(_logits(theirs, calib_ids), ours, rtol=0, atol=1e-5)
    with theirs.disable_adapter():
        assert (_logits(theirs, calib_ids) - ours).abs().max() > 1e-2    # negative control: adapter matters


def _pruned_half(model):
    """Zero the smaller half of every decoder linear's weights (per row), as pruning would."""
    for name in _decoder_linears(model):
        w = model.get_submodule(name).weight.data
        keep = w.abs() >= w.abs().median(dim=1, keepdim=True).values
        w.mul_(keep)


def test_a_dense_base_trained_under_its_mask_is_merged_into_a_plain_checkpoint(tokenizer, calib_ids, tmp_path):
    model = tiny_model("qwen2")
    _pruned_half(model)
    gen = torch.Generator().manual_seed(0)
    masks = {}
    for name in _decoder_linears(model):
        base = model.get_submodule(name)
        masks[name] = sparsity_mask(base.weight)
        module = LoRALinear(base, RANK, ALPHA, mask=masks[name], mask_during_training=True, generator=gen)
        with torch.no_grad():
            module.lora_B.normal_(0.0, 0.05, generator=gen)
        set_module(model, name, module)
    path = compress.export(model, tokenizer, tmp_path / "ck")
    config = json.loads((path / "config.json").read_text())
    assert "compress_adapter" not in config and not (path / "adapter").exists()
    theirs = AutoModelForCausalLM.from_pretrained(path)               # a plain transformers checkpoint
    assert torch.equal(_logits(theirs, calib_ids), _logits(model, calib_ids))
    for name, mask in masks.items():
        assert torch.equal(theirs.get_submodule(name).weight != 0, mask)   # merged under the mask, zero for zero


def test_a_mask_unused_in_training_exports_the_plain_adapter_it_computes(tokenizer, calib_ids, tmp_path):
    model = tiny_model("llama")
    _pruned_half(model)
    names = _with_adapters(model)
    for name in names:
        module = model.get_submodule(name)
        module.register_buffer("mask", sparsity_mask(module.base.weight))      # mask_during_training stays False
    path = compress.export(model, tokenizer, tmp_path / "ck")
    reloaded, _ = compress.load_model(path)
    assert isinstance(reloaded.get_submodule(Q), LoRALinear)
    assert torch.equal(_logits(reloaded, calib_ids), _logits(model, calib_ids))


def _refused(model, tokenizer, tmp_path, match):
    with pytest.raises(CheckpointError, match=match):
        compress.export(model, tokenizer, tmp_path / "ck")
    assert list(tmp_path.iterdir()) == []                             # nothing written, no temporary left


def test_a_packed_base_trained_under_a_mask_is_refused(tokenizer, calib_ids, tmp_path):
    model = _base_model("llama", "int4", calib_ids)
    base = model.get_submodule(Q)
    mask = torch.rand(base.out_features, base.in_features, generator=torch.Generator().manual_seed(0)) > 0.5
    set_module(model, Q, LoRALinear(base, RANK, ALPHA, mask=mask, mask_during_training=True))
    _refused(model, tokenizer, tmp_path, rf"{Q}: .* packed QuantLinear .*unwrap_lora.*mask_during_training=False")


def test_mixed_ranks_are_refused_naming_both_modules(tokenizer, tmp_path):
    model = tiny_model("llama")
    _with_adapters(model)
    k = "model.layers.1.mlp.up_proj"
    set_module(model, k, LoRALinear(model.get_submodule(k).base, 8, ALPHA))
    _refused(model, tokenizer, tmp_path, rf"model.layers.0.self_attn.q_proj has rank 4, alpha 8 but {k} has rank 8")


def test_an_interrupted_export_keeps_the_old_checkpoint(tokenizer, tmp_path, monkeypatch):
    model = tiny_model("llama")
    _with_adapters(model)
    path = compress.export(model, tokenizer, tmp_path / "ck")
    before = {f.relative_to(path): f.read_bytes() for f in path.rglob("*") if f.is_file()}

    def crash(adapters, directory, **kw):
        (directory / "adapter").mkdir()
        (directory / "adapter" / "adapter_model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(export_module, "write_adapters", crash)
    with pytest.raises(KeyboardInterrupt):
        compress.export(model, tokenizer, path, overwrite=True)
    assert {f.relative_to(path): f.read_bytes() for f in path.rglob("*") if f.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


@pytest.fixture
def exported(tokenizer, tmp_path):
    model = tiny_model("llama")
    _with_adapters(model)
    return compress.export(model, tokenizer, tmp_path / "ck")


def _edit_json(path, edit):
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _bad_shape(path):
    f = path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(str(f))
    tensors[f"base_model.model.{Q}.lora_A.weight"] = torch.zeros(RANK, 65)
    save_file(tensors, str(f))


def _without_lora_b(path):
    f = path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(f)).items() if "lora_B" not in k}, str(f))


def _renamed_module(path):
    """Every file names model.layers.0.self_attn.q_proj as ...q_prj, a module the model lacks."""
    new = Q.replace("q_proj", "q_prj")
    _edit_json(path / "config.json", lambda c: c["compress_adapter"].update(
        modules=sorted(new if m == Q else m for m in c["compress_adapter"]["modules"])))
    _edit_json(path / "adapter" / "adapter_config.json", lambda c: c.update(
        target_modules=[new if m == Q else m for m in c["target_modules"]]))
    f = path / "adapter" / "adapter_model.safetensors"
    save_file({k.replace(Q, new): v for k, v in load_file(str(f)).items()}, str(f))


CORRUPTIONS = {
    "bad json": (lambda p: (p / "adapter" / "adapter_config.json").write_text("{r: 4"),
                 r"adapter_config.json is not valid JSON"),
    "config disagrees": (lambda p: _edit_json(p / "adapter" / "adapter_config.json", lambda c: c.update(r=8)),
                         r"adapter_config.json does not match config.json\['compress_adapter'\].*'r': 8"),
    "no weights": (lambda p: (p / "adapter" / "adapter_model.safetensors").unlink(),
                   r"adapter_model.safetensors is missing; .*Copy the whole export directory"),
    "no adapter dir": (lambda p: shutil.rmtree(p / "adapter"),
                       r"adapter_config.json is missing"),
    "truncated": (lambda p: (p / "adapter" / "adapter_model.safetensors").write_bytes(
        (p / "adapter" / "adapter_model.safetensors").read_bytes()[:-100]), r"adapter_model.safetensors is truncated"),
    "wrong shape": (_bad_shape, rf"tensor 'base_model.model.{Q}.lora_A.weight' is torch.float32 \(4, 65\), "
                                r"the model and rank 4 need a float \(4, 64\)"),
    "missing tensor": (_without_lora_b, r"missing \['base_model.model.model.layers.0.mlp.down_proj.lora_B"),
    "newer version": (lambda p: _edit_json(p / "config.json", lambda c: c["compress_adapter"].update(version=2)),
                      r"compress_adapter version 2 is not supported; .*upgrade compress"),
    "unknown module": (_renamed_module, r"names module '.*q_prj', which the model does not have"),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_damaged_adapter_is_refused_with_what_to_do(exported, corruption):
    damage, match = CORRUPTIONS[corruption]
    compress.load_model(exported)                                     # negative control: intact, it loads
    damage(exported)
    with pytest.raises(CheckpointError, match=match):
        compress.load_model(exported)


def test_inspect_reports_the_adapter(exported):
    info = compress.inspect_checkpoint(exported)
    ad = info["adapter"]
    assert (ad["modules"], ad["rank"], ad["alpha"]) == (14, RANK, ALPHA)
    # rank * (in + out) per linear: q 64+64, k and v 64+32, o 64+64, gate and up 64+160, down 160+64; 2 layers
    assert ad["parameters"] == 2 * RANK * (128 + 2 * 96 + 128 + 3 * 224) == 8960
    assert "low-rank adapter: 14 modules, rank 4, alpha 8," in format_inspection(info)
    assert info["parameters"] == sum(p.numel() for p in tiny_model("llama").parameters())     # the main checkpoint


def test_report_and_backend_see_the_base_through_the_adapter(calib_ids):
    model = _base_model("llama", "int4", calib_ids)
    before = summarize(model)
    _with_adapters(model)
    after = summarize(model)
    adapter_params = sum(m.lora_A.numel() + m.lora_B.numel() for m in model.modules() if isinstance(m, LoRALinear))
    assert after["bits"] == before["bits"] == "int4"
    assert after["parameters"] == before["parameters"] + adapter_params
    assert after["bytes"] == before["bytes"] + 4 * adapter_params           # float32 adapters
    assert after["bits_per_weight"] == before["bits_per_weight"]
    assert set_backend(model, "torch") == 14
    assert all(m.backend == "torch" for m in model.modules() if isinstance(m, PackedLinear))
