"""Device profiles: the shipped table, validation, aliases, the user directory, measuring the CPU, the CLI."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest
import yaml

from compress.errors import ConfigError
from compress.plan import devices
from compress.plan.devices import (DeviceProfile, add_devices_parser, builtin_profiles, format_profiles, list_profiles,
                                   load_profile, match_local_profile, measure_profile, run_devices, save_profile,
                                   user_profile_dir)

REQUIRED = ("h100", "h200", "b200", "a100", "l40s", "rtx4090", "cpu")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets an empty user directory (never the real ~/.cache/compress)."""
    monkeypatch.setenv("COMPRESS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _profile_dict(**changes) -> dict:
    data = builtin_profiles()["h100"].to_dict()
    data.update(changes)
    return data


def _write(path, data: dict, version=1):
    path.write_text(yaml.safe_dump({"version": version, **data}, sort_keys=False))
    return path


def _cli(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="compress")
    add_devices_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["devices", *argv])


# ----------------------------------------------------------------------------- shipped profiles

def test_builtins_load_validate_and_cover_the_required_devices():
    profiles = builtin_profiles()
    assert set(REQUIRED) <= set(profiles)
    for name, p in profiles.items():
        assert p.name == name and p.origin == devices.BUILTIN
        assert p.kind == ("cpu" if name == "cpu" else "gpu")
        assert p.source == "datasheet" and p.notes
        # a round trip through the validating constructor changes nothing
        assert DeviceProfile.from_dict(p.to_dict()) == p


def test_builtin_numbers_keep_their_known_relationships():
    p = builtin_profiles()
    assert p["h200"].bandwidth_gbs > p["h100"].bandwidth_gbs and p["h200"].memory_gb > p["h100"].memory_gb
    assert p["h200"].tflops == p["h100"].tflops                       # same GH100 compute
    assert p["b200"].bandwidth_gbs > p["h200"].bandwidth_gbs
    assert "fp4" in p["b200"].tflops and {"nvfp4", "mxfp4"} <= set(p["b200"].native_formats)
    assert "fp8" not in p["a100"].tflops and "fp8" not in p["a100"].native_formats
    for name in ("h100", "h200", "l40s", "rtx4090", "b200"):
        assert "fp8" in p[name].native_formats
    for name, prof in p.items():
        if "fp4" not in prof.tflops:
            assert not {"nvfp4", "mxfp4"} & set(prof.native_formats), name
        # dense figures: fp8 is twice bf16 on every tensor-core GPU that has it (no 2:4 doubling slipped in)
        if "fp8" in prof.tflops:
            assert prof.tflops["fp8"] == pytest.approx(2 * prof.tflops["bf16"], rel=0.02), name
        if prof.kind == "gpu":
            assert prof.tflops["bf16"] > 1.5 * prof.tflops["fp32"] > 0, name         # tensor cores
    assert p["cpu"].bandwidth_gbs < p["rtx4090"].bandwidth_gbs / 10


# ----------------------------------------------------------------------------------- names

@pytest.mark.parametrize("alias, name", [
    ("H100", "h100"), ("h100-sxm", "h100"), ("nvidia-h100", "h100"), ("NVIDIA H100", "h100"),
    ("4090", "rtx4090"), ("rtx-4090", "rtx4090"), ("GeForce RTX 4090", "rtx4090"), ("RTX_4090", "rtx4090"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"), ("generic-cpu", "cpu"), ("nvidia-b200", "b200"),
    ("a100-sxm4", "a100"), ("L40S", "l40s"),
])
def test_aliases(alias, name):
    assert load_profile(alias).name == name


def test_unknown_name_lists_the_known_ones_and_how_to_measure():
    with pytest.raises(ConfigError) as exc:
        load_profile("mi300x")
    message = str(exc.value)
    assert "'mi300x'" in message
    for name in REQUIRED:
        assert name in message
    assert "--measure" in message


@pytest.mark.parametrize("gpu_name, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200"), ("NVIDIA B200", "b200"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"), ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA GH200 480GB", None), ("NVIDIA GB200", None), ("NVIDIA L40", None), ("NVIDIA RTX A6000", None),
])
def test_gpu_names_map_to_builtins(gpu_name, expected):
    assert devices._builtin_for_gpu_name(gpu_name) == expected


# ------------------------------------------------------------------------------ validation

@pytest.mark.parametrize("changes, field", [
    ({"bandwidth_gbs": -3350}, "bandwidth_gbs"),
    ({"memory_gb": 0}, "memory_gb"),
    ({"tflops": {"bf16": 989, "fp16": 989}}, "tflops.fp16"),
    ({"tflops": {"bf16": True}}, "tflops.bf16"),
    ({"efficiency": {"decode": {"bf16": 1.2, "int": 0.7, "fp4": 0.6, "sparse24": 0.5, "attention": 0.7},
                     "prefill": {"bf16": 0.7, "int": 0.5, "fp4": 0.5, "sparse24": 0.4, "attention": 0.5}}},
     "efficiency.decode.bf16"),
    ({"efficiency": {"decode": {"bf16": 0.8}, "prefill": {"bf16": 0.7}}}, "efficiency.decode"),
    ({"native_formats": ["bf16", "int4"]}, "native_formats"),
    ({"kernel_formats": ["int5"]}, "kernel_formats"),
    ({"kind": "tpu"}, "kind"),
    ({"source": "guess"}, "source"),
    ({"overhead_us": -1}, "overhead_us"),
])
def test_a_bad_field_names_the_field_and_the_file(tmp_path, changes, field):
    path = _write(tmp_path / "bad.yaml", _profile_dict(name="bad", **changes))
    with pytest.raises(ConfigError) as exc:
        load_profile(str(path))
    assert field in str(exc.value) and str(path) in str(exc.value) and "'bad'" in str(exc.value)


def test_unknown_missing_field_version_and_broken_yaml(tmp_path):
    path = _write(tmp_path / "extra.yaml", _profile_dict(name="extra", hbm_stacks=5))
    with pytest.raises(ConfigError, match=r"extra.yaml\): unknown field\(s\) hbm_stacks"):
        load_profile(str(path))
    data = _profile_dict(name="short")
    del data["bandwidth_gbs"]
    with pytest.raises(ConfigError, match=r"missing field\(s\) bandwidth_gbs"):
        load_profile(str(_write(tmp_path / "short.yaml", data)))
    with pytest.raises(ConfigError, match="version"):
        load_profile(str(_write(tmp_path / "v2.yaml", _profile_dict(name="v2"), version=2)))
    (tmp_path / "broken.yaml").write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_profile(str(tmp_path / "broken.yaml"))


# --------------------------------------------------------------------------- user directory

def test_user_dir_follows_compress_home(home):
    assert user_profile_dir() == home / "devices"


def test_save_load_round_trip_and_user_profile_shadows_the_builtin(home):
    builtin = builtin_profiles()["h100"]
    faster = dataclasses.replace(builtin, bandwidth_gbs=3000.0, source="measured", notes="measured here")
    path = save_profile(faster)
    assert path == home / "devices" / "h100.yaml"
    assert not [p for p in path.parent.iterdir() if p.name != "h100.yaml"]       # no temp file left behind
    loaded = load_profile("h100")
    assert loaded == faster and loaded != builtin
    assert loaded.origin == str(path)
    assert load_profile("NVIDIA H100").bandwidth_gbs == 3000.0                    # aliases reach it too
    listed = {p.name: p for p in list_profiles()}
    assert listed["h100"].bandwidth_gbs == 3000.0 and len(listed) == len(builtin_profiles())
    table = format_profiles(list_profiles())
    assert "h100*" in table and "h200*" not in table
    # a saved profile with a new name is listed next to the builtins and loads by name and by path
    other = save_profile(dataclasses.replace(faster, name="lab-box"))
    assert load_profile("lab-box") == dataclasses.replace(faster, name="lab-box")
    assert load_profile(str(other)).name == "lab-box"
    assert "lab-box" in {p.name for p in list_profiles()}


def test_match_local_profile_on_cpu_prefers_a_saved_profile():
    assert match_local_profile("cpu") == builtin_profiles()["cpu"]
    saved = dataclasses.replace(builtin_profiles()["cpu"], bandwidth_gbs=12.5, source="measured")
    save_profile(saved)
    assert match_local_profile("cpu") == saved


# ------------------------------------------------------------------------------- measuring

def test_measure_profile_on_cpu(home):
    p = measure_profile("cpu", quick=True)
    assert p.kind == "cpu" and p.source == "measured" and p.name == "cpu"
    assert p.bandwidth_gbs > 0 and p.tflops["fp32"] > 0 and p.overhead_us > 0 and p.memory_gb > 0.1
    assert p.bandwidth_gbs != builtin_profiles()["cpu"].bandwidth_gbs            # a measured number, not copied
    assert set(p.tflops) <= {"fp32", "bf16"}                                      # no int8 / fp8 timing on CPU
    assert p.efficiency == builtin_profiles()["cpu"].efficiency
    assert p.kernel_formats == builtin_profiles()["cpu"].kernel_formats
    assert "quick" in p.notes
    named = measure_profile("cpu", quick=True, name="my-cpu", base=builtin_profiles()["h100"])
    assert named.name == "my-cpu" and named.native_formats == ["bf16", "fp8", "int8"]
    assert "tf32" in named.tflops and named.tflops["tf32"] == 494.7       # untimed dtype kept from the base


def test_measure_rejects_a_device_it_cannot_profile():
    with pytest.raises(ConfigError, match="only cpu and cuda"):
        measure_profile("meta", quick=True)


# -------------------------------------------------------------------------------------- CLI

def test_run_devices_lists_the_table(capsys):
    assert run_devices(_cli()) == 0
    out = capsys.readouterr().out
    assert "h100" in out and "b200" in out and "rtx4090" in out
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["name", "description", "mem", "GB"]
    b200 = next(line for line in lines if line.startswith("b200 "))
    assert "7700" in b200 and "9000" in b200 and "nvfp4" in b200                # bandwidth, fp4, native formats


def test_run_devices_json_show_and_save(capsys, home, monkeypatch):
    assert run_devices(_cli("--json")) == 0
    names = [p["name"] for p in json.loads(capsys.readouterr().out)]
    assert set(REQUIRED) <= set(names)
    assert run_devices(_cli("--show", "H200")) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["name"] == "h200" and shown["bandwidth_gbs"] == 4800
    # --measure --save NAME: measured (quick, to stay fast), printed, saved under NAME
    monkeypatch.setattr(devices, "measure_profile",
                        lambda device, *, name=None, seconds=1.0: measure_profile(device, name=name, quick=True))
    assert run_devices(_cli("--measure", "--device", "cpu", "--save", "bench-box")) == 0
    out = capsys.readouterr().out
    assert "saved 'bench-box'" in out and (home / "devices" / "bench-box.yaml").is_file()
    assert load_profile("bench-box").source == "measured"


def test_run_devices_flag_errors():
    with pytest.raises(ConfigError, match="--save goes with --measure"):
        run_devices(_cli("--save"))
    with pytest.raises(ConfigError, match="--device goes with --measure"):
        run_devices(_cli("--device", "cpu"))
    with pytest.raises(ConfigError, match="unknown device profile"):
        run_devices(_cli("--show", "tpu-v5"))
