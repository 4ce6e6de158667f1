"""The Triton NVFP4 / MXFP4 kernels against a float64 reference: every config, the edge shapes, the
dequantize kernel bit for bit, and a whole FP4Linear module on the triton backend."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from kernel_cases import CUDA, REL_TOL, rel_err, triton_device  # noqa: F401  (fixture)

from compress.kernels import tuning
from compress.kernels.fp4_linear import BLOCK, fp4_dequant_weight, fp4_linear
from compress.quant.fp4 import mxfp4_dequantize, nvfp4_dequantize
from compress.kernels.fp4_packing import pack_fp4

CONFIGS = tuning.all_configs()
KINDS = ("nvfp4", "mxfp4")
ZERO_BLOCK_E4M3 = 0x30                     # 0.125, the scale compressed-tensors gives an all-zero block


@dataclasses.dataclass
class FP4Case:
    kind: str
    codes: torch.Tensor                    # (N, K) uint8 E2M1 codes, on the CPU
    scale_bits: torch.Tensor               # (N, K / block) uint8: E4M3 bits (NVFP4) or E8M0 exponents
    global_scale: torch.Tensor | None      # float32 (1,), NVFP4 only
    bias: torch.Tensor | None
    device: str

    @property
    def packed(self) -> torch.Tensor:
        return pack_fp4(self.codes).to(self.device)

    @property
    def scale(self) -> torch.Tensor:
        s = self.scale_bits.view(torch.float8_e4m3fn) if self.kind == "nvfp4" else self.scale_bits
        return s.to(self.device)

    @property
    def gscale(self) -> torch.Tensor | None:
        return None if self.global_scale is None else self.global_scale.to(self.device)

    @property
    def args(self) -> tuple:
        return self.packed, self.scale, self.gscale

    def weight64(self, device="cpu") -> torch.Tensor:
        """The float64 weight, from the format's own dequantize (independent of the kernels)."""
        codes, bits = self.codes.to(device), self.scale_bits.to(device)
        if self.kind == "nvfp4":
            return nvfp4_dequantize(codes, bits.view(torch.float8_e4m3fn), self.global_scale.to(device), torch.float64)
        return mxfp4_dequantize(codes, bits, torch.float64)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.cpu().double()
        return torch.nn.functional.linear(x.cpu().double(), self.weight64(), b)


def make_fp4_case(kind: str, n: int, k: int, *, bias: bool = True, dtype=torch.float16, device="cpu", seed: int = 0,
                  scale_range: tuple[int, int] | None = None, global_scale: float = 1000.0) -> FP4Case:
    """Random codes and valid scales. The default scale ranges give weights of a real layer's size
    (|w| up to ~0.2) spread over two to three decades, so a misplaced scale shows."""
    gen = torch.Generator().manual_seed(seed)
    block = BLOCK[kind]
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    lo, hi = scale_range or ((0x28, 0x5F) if kind == "nvfp4" else (112, 123))   # E4M3 0.25..30; 2^-15..2^-5
    bits = torch.randint(lo, hi, (n, k // block), generator=gen, dtype=torch.uint8)
    g = torch.tensor([global_scale], dtype=torch.float32) if kind == "nvfp4" else None
    b = torch.randn(n, generator=gen).to(dtype).to(device) if bias else None
    return FP4Case(kind, codes, bits, g, b, device)


def _run(case: FP4Case, x: torch.Tensor, cfg: tuning.KernelConfig | None) -> torch.Tensor:
    from compress.kernels import fp4_linear_triton as tk
    return tk.fp4_linear(x, *case.args, case.bias, kind=case.kind, config=cfg)


def _batch(cfg: tuning.KernelConfig) -> int:
    """A batch that exercises the config: one row, a partial M tile, or a full and a partial M tile."""
    if cfg.kind == "splitk":
        return 1 if cfg.block_m == 1 else 5
    return cfg.block_m + 3 if cfg.kind == "tiled" else 7


@pytest.mark.parametrize("kind,dtype", [("nvfp4", torch.float16), ("mxfp4", torch.bfloat16)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_config_matches_the_reference(cfg, kind, dtype, triton_device):
    # N = 72 is not a multiple of any BLOCK_N; K (13 NVFP4 blocks, 7 MXFP4 blocks) is not a multiple
    # of any BLOCK_K, so the last K tile is partial.
    k = 208 if kind == "nvfp4" else 224
    case = make_fp4_case(kind, 72, k, dtype=dtype, device=triton_device)
    x = torch.randn(_batch(cfg), k).to(dtype).to(triton_device)
    y = _run(case, x, cfg)
    assert y.shape == (x.shape[0], 72) and y.dtype == dtype
    assert rel_err(y, case.reference(x)) < REL_TOL[dtype]


ONE_TOKEN_CONFIGS = [c for c in CONFIGS if c.kind == "splitk" and c.block_m == 1 and c.split_k == 2]


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "x_offset_by_one"])
@pytest.mark.parametrize("kind,dtype", [("nvfp4", torch.bfloat16), ("mxfp4", torch.float16)])
@pytest.mark.parametrize("cfg", ONE_TOKEN_CONFIGS, ids=[c.name for c in ONE_TOKEN_CONFIGS])
def test_one_token_on_whole_tiles(cfg, kind, dtype, offset, triton_device):
    """N and K multiples of the tile: the one-token loop without masks (EVEN), bf16 activations read
    as int32 pairs when 4-byte aligned and one by one when not (a view one element in)."""
    n, k = 2 * cfg.block_n, 2 * cfg.block_k
    case = make_fp4_case(kind, n, k, dtype=dtype, device=triton_device, seed=offset)
    x = torch.randn(1, k + offset).to(dtype).to(triton_device)[:, offset:]
    y = _run(case, x, cfg)
    assert rel_err(y, case.reference(x)) < REL_TOL[dtype]


# (M, N, K, kind, dtype, bias): M = 1, one block narrower than every tile, odd N, every dtype.
SHAPES = [
    (1, 40, 16, "nvfp4", torch.float32, False),     # M = 1, K = one NVFP4 block
    (1, 33, 96, "mxfp4", torch.float16, True),      # M = 1, three MXFP4 blocks, N not a tile multiple
    (3, 40, 208, "nvfp4", torch.bfloat16, True),    # small batch (split-K with tl.dot), partial K tile
    (16, 24, 160, "mxfp4", torch.float32, False),   # M = 16, the split-K limit
    (40, 56, 112, "nvfp4", torch.float16, True),    # medium batch: tiled
    (300, 24, 64, "mxfp4", torch.bfloat16, True),   # large batch: dequantize + GEMM
    (300, 24, 48, "nvfp4", torch.float32, False),
]


@pytest.mark.parametrize("m,n,k,kind,dtype,bias", SHAPES)
def test_shapes_with_the_chosen_config(m, n, k, kind, dtype, bias, triton_device):
    case = make_fp4_case(kind, n, k, bias=bias, dtype=dtype, device=triton_device, seed=m)
    x = torch.randn(1, m, k).to(dtype).to(triton_device)          # leading dims are flattened
    y = fp4_linear(x, *case.args, case.bias, kind=kind, backend="triton")
    assert y.shape == (1, m, n) and y.dtype == dtype
    assert rel_err(y, case.reference(x)) < REL_TOL[dtype]


@pytest.mark.skipif(not CUDA, reason="real layer shapes run on the GPU only (the interpreter is too slow)")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("m", [1, 4, 16, 64, 256])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336), (6144, 4096)])
def test_real_llama3_8b_shapes(m, n, k, kind, triton_device, monkeypatch):
    # The shape heuristic picks the schedule (split-K, tiled, dense) without timing 50 candidates
    # per shape or touching the user's autotune cache; every config is tested above.
    monkeypatch.setenv("COMPRESS_AUTOTUNE", "0")
    case = make_fp4_case(kind, n, k, bias=False, dtype=torch.bfloat16, device=triton_device)
    x = torch.randn(m, k, dtype=torch.bfloat16, device=triton_device)
    y = fp4_linear(x, *case.args, None, kind=kind, backend="triton")
    ref = x.double() @ case.weight64(triton_device).T                            # float64 on the GPU
    assert rel_err(y, ref) < REL_TOL[torch.bfloat16]


ZERO_CONFIGS = [tuning.KernelConfig("splitk", 1, 32, 64, 2), tuning.KernelConfig("splitk", 16, 32, 64, 1),
                tuning.KernelConfig("tiled", 16, 32, 64, 1)]


@pytest.mark.parametrize("kind", KINDS)
def test_an_all_zero_block_contributes_nothing(kind, triton_device):
    """Block 0 of every row is all code 0 with the scale an all-zero block gets (0.125 for NVFP4,
    2^-127 for MXFP4): whatever the activations in its columns, the output must not change, not even
    by rounding, and it shares its K tile with nonzero blocks."""
    block = BLOCK[kind]
    case = make_fp4_case(kind, 40, 8 * block, bias=False, dtype=torch.float32, device=triton_device)
    case.codes[:, :block] = 0
    case.scale_bits[:, 0] = ZERO_BLOCK_E4M3 if kind == "nvfp4" else 0
    x = torch.randn(3, 8 * block, device=triton_device)
    x2 = x.clone()
    x2[:, :block] = torch.randn(3, block, device=triton_device) * 100
    for cfg in ZERO_CONFIGS:
        rows = 1 if cfg.block_m == 1 else 3
        y = _run(case, x[:rows], cfg)
        y2 = _run(case, x2[:rows], cfg)
        assert torch.equal(y, y2), cfg.name       # exact zeros: no cancellation of large terms
        assert rel_err(y, case.reference(x[:rows])) < REL_TOL[torch.float32]


@pytest.mark.parametrize("cfg", ZERO_CONFIGS + [tuning.KernelConfig("dense")], ids=lambda c: c.name)
def test_subnormal_e4m3_block_scales(cfg, triton_device):
    # Bytes 1..7 are the E4M3 subnormals (m * 2^-9), 8..15 the smallest normals: decoded exactly.
    case = make_fp4_case("nvfp4", 48, 128, dtype=torch.float32, device=triton_device, scale_range=(1, 16),
                         global_scale=0.1)
    s = case.scale_bits
    assert bool((s < 8).any()) and bool((s >= 8).any())
    x = torch.randn(1 if cfg.block_m == 1 else 5, 128, device=triton_device)
    assert rel_err(_run(case, x, cfg), case.reference(x)) < REL_TOL[torch.float32]


POISON_CONFIGS = [c for c in CONFIGS if c.kind != "dense" and c.split_k in (1, 2)][::7]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("cfg", POISON_CONFIGS, ids=lambda c: c.name)
def test_every_output_element_is_written(cfg, kind, triton_device):
    from compress.kernels import fp4_linear_triton as tk
    k = 208 if kind == "nvfp4" else 224
    case = make_fp4_case(kind, 72, k, dtype=torch.float32, device=triton_device)
    m = _batch(cfg)
    x = torch.randn(m, k, device=triton_device)
    out = torch.full((m, 72), float("nan"), device=triton_device)
    tk.fp4_matmul(x, *case.args, case.bias, kind=kind, config=cfg, out=out)
    assert rel_err(out, case.reference(x)) < REL_TOL[torch.float32]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")   # fp16 inf, as the reference
def test_dequantize_kernel_is_bit_exact(kind, dtype, triton_device):
    """Against the kernels' reference ``fp4_dequant_weight``, over every finite positive E4M3 scale
    (subnormals included) or a wide range of E8M0 exponents, plus an all-zero block."""
    from compress.kernels import fp4_linear_triton as tk
    block = BLOCK[kind]
    k = 7 * block if kind == "mxfp4" else 13 * block                 # not a multiple of BLOCK_K
    case = make_fp4_case(kind, 40, k, device=triton_device, scale_range=(1, 0x7F) if kind == "nvfp4" else (64, 191),
                         global_scale=2688 / 0.37)
    case.codes[0, :block] = 0
    case.scale_bits[0, 0] = ZERO_BLOCK_E4M3 if kind == "nvfp4" else 0
    w = tk.fp4_dequant_weight(*case.args, kind=kind, dtype=dtype)
    ref = fp4_dequant_weight(*case.args, kind=kind, dtype=dtype)
    assert torch.equal(w.float().cpu().isfinite(), ref.float().cpu().isfinite())
    if dtype == torch.bfloat16 and not CUDA:
        # Triton 3.9's interpreter rounds float32 -> bf16 toward zero (the GPU rounds to nearest
        # even): allow one bf16 step there, exact everywhere else.
        ok = ref.isfinite()
        assert torch.all((w[ok].float() - ref[ok].float()).abs() <= ref[ok].float().abs() * 2.0 ** -7)
    else:
        assert torch.equal(w, ref)


def test_empty_batch(triton_device):
    case = make_fp4_case("nvfp4", 40, 64, device=triton_device)
    y = fp4_linear(torch.zeros(0, 64, dtype=torch.float16, device=triton_device), *case.args, case.bias,
                   kind="nvfp4", backend="triton")
    assert y.shape == (0, 40)


def test_bad_inputs_are_refused_with_the_reason(triton_device):
    from compress.kernels import fp4_linear_triton as tk
    case = make_fp4_case("nvfp4", 40, 64, device=triton_device)
    packed, scale, g = case.args
    x = torch.randn(2, 64, dtype=torch.float16, device=triton_device)
    with pytest.raises(ValueError, match="block scales must be torch.float8_e4m3fn"):
        tk.fp4_linear(x, packed, scale.float(), g, None, kind="nvfp4")
    with pytest.raises(ValueError, match="global scale"):
        tk.fp4_linear(x, packed, scale, None, None, kind="nvfp4")
    with pytest.raises(ValueError, match="holds in_features = 64"):
        tk.fp4_linear(x[:, :32], packed, scale, g, None, kind="nvfp4")
    with pytest.raises(ValueError, match="mxfp4 block scales must be torch.uint8 of shape \\(40, 2\\)"):
        tk.fp4_linear(x, packed, scale, None, None, kind="mxfp4")


def test_autotune_key_names_the_format():
    from compress.kernels import fp4_linear_triton as tk
    assert tk.autotune_key("nvfp4", False, torch.bfloat16, 3, 4096, 14336) == "nvfp4|bias0|bfloat16|m4|n4096|k14336"
    assert tk.autotune_key("mxfp4", True, torch.float16, 1, 8, 32).startswith("mxfp4|bias1|float16|m1|")


@pytest.mark.parametrize("scheme", ["nvfp4a16", "mxfp4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp4_linear_module_on_triton_matches_torch(scheme, dtype, triton_device):
    """A whole FP4Linear built from a quantized weight: the triton backend gives the torch backend's
    outputs at M = 1 and for a batch, and both really differ from the unquantized layer."""
    from compress.quant.fp4 import (mxfp4_block_scales, mxfp4_quantize, nvfp4_block_scales, nvfp4_global_scale,
                                    nvfp4_quantize)
    from compress.quant.fp4_linear import FP4Linear
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(48, 96, generator=gen) * 0.02
    bias = torch.randn(48, generator=gen) * 0.1
    if scheme == "nvfp4a16":
        g = nvfp4_global_scale(w.abs().max())
        scale = nvfp4_block_scales(w, g)
        codes = nvfp4_quantize(w, g, scale)
    else:
        g, scale = None, mxfp4_block_scales(w)
        codes = mxfp4_quantize(w, scale)
    layer = FP4Linear.from_codes(codes, scale, g, scheme=scheme, bias=bias, dtype=dtype).to(triton_device)
    for shape in ((2, 5, 96), (1, 1, 96)):
        x = torch.randn(*shape, generator=gen).to(dtype).to(triton_device)
        layer.backend = "torch"
        ref = layer(x)
        layer.backend = "triton"
        y = layer(x)
        assert y.shape == ref.shape and y.dtype == dtype
        assert rel_err(y, ref) < REL_TOL[dtype]
        dense = torch.nn.functional.linear(x.double(), w.double().to(triton_device), bias.double().to(triton_device))
        assert rel_err(ref, dense) > 10 * REL_TOL[torch.float32]      # the layer really is 4-bit


def test_benchmark_smoke_nvfp4(tmp_path, triton_device):
    """benchmarks/linear_kernels.py --format nvfp4 runs end to end (tiny shapes, interpreter on the CPU)."""
    script = Path(__file__).resolve().parents[2] / "benchmarks" / "linear_kernels.py"
    spec = importlib.util.spec_from_file_location("bench_kernels_fp4", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "k.json"
    assert bench.main(["--format", "nvfp4", "--device", triton_device, "--shapes", "96x40", "--batches", "1,5",
                       "--repeat", "1", "--json-out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert [r["m"] for r in data["rows"]] == [1, 5]
    for row in data["rows"]:
        assert row["format"] == "nvfp4" and row["block_size"] == 16
        assert row["ours_us"] > 0 and row["bf16_us"] > 0 and row["ideal_speedup"] > 1
        assert row["speedup"] == pytest.approx(row["bf16_us"] / row["ours_us"])
