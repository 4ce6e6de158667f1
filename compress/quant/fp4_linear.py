"""FP4Linear: a linear layer holding NVFP4 or MXFP4 weights, packed as compressed-tensors stores them.

Buffers (the checkpoint's tensor names, so the module's state dict *is* the checkpoint):

- ``weight_packed``       uint8 (out, in/2): E2M1 codes, column 2k in the low nibble;
- ``weight_scale``        NVFP4: float8_e4m3fn (out, in/16); MXFP4: uint8 E8M0 exponents (out, in/32);
- ``weight_global_scale`` float32 (1,), NVFP4 only: the per-tensor divisor ``448*6 / amax``;
- ``input_global_scale``  float32 (1,), NVFP4 W4A4 only: the activations' divisor from calibration.

With ``act_quant`` (scheme ``nvfp4``, W4A4) the forward pass first rounds the activations to
NVFP4 with dynamic per-16-block scales over the static ``input_global_scale``: a simulation of
what a Blackwell GPU computes natively, so W4A4 quality can be seen anywhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import FP4_SCHEMES, WeightFormat
from ..kernels.fp4_linear import fp4_dequant_weight, fp4_linear
from ..kernels.fp4_packing import pack_fp4
from .fp4 import nvfp4_fake_quantize_activations, nvfp4_global_scale
from .packed import PackedLinear


class FP4Linear(PackedLinear):
    def __init__(self, in_features: int, out_features: int, *, scheme: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 backend: str = "auto", observer: str | None = None):
        super().__init__()
        if scheme not in FP4_SCHEMES:
            raise ValueError(f"FP4Linear scheme must be one of {sorted(FP4_SCHEMES)}, got {scheme!r}")
        self.weight_format = WeightFormat.from_scheme(scheme)
        self.kind, block = self.weight_format.kind, self.weight_format.group_size
        if in_features % block:
            raise ValueError(f"{self.kind.upper()} needs in_features to be a multiple of {block}, got {in_features}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.act_quant = self.weight_format.act_quant
        self.backend, self.observer = backend, observer
        self.bits, self.group_size, self.symmetric = 4, block, True     # what reports read
        self.register_buffer("weight_packed", torch.zeros(out_features, in_features // 2, dtype=torch.uint8,
                                                          device=device))
        scale_dtype = torch.float8_e4m3fn if self.kind == "nvfp4" else torch.uint8
        self.register_buffer("weight_scale", torch.ones(out_features, in_features // block, device=device)
                             .to(scale_dtype))
        if self.kind == "nvfp4":
            self.register_buffer("weight_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.weight_global_scale = None
        if self.act_quant:
            self.register_buffer("input_global_scale", torch.ones(1, dtype=torch.float32, device=device))
        else:
            self.input_global_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None
        self._dtype = dtype

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None, *,
                   scheme: str, bias: torch.Tensor | None, dtype: torch.dtype,
                   input_global_scale: torch.Tensor | None = None, observer: str | None = None) -> FP4Linear:
        """Build from uint8 E2M1 codes (out, in) and the solver's block (and global) scales."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, scheme=scheme, bias=bias is not None, dtype=dtype,
                     device=codes.device, observer=observer)
        module.weight_packed.copy_(pack_fp4(codes))
        module.weight_scale.copy_(scale)
        if module.weight_global_scale is not None:
            module.weight_global_scale.copy_(global_scale.reshape(1))
        if module.act_quant:
            if input_global_scale is None:
                raise ValueError("NVFP4 W4A4 needs input_global_scale from calibration (the activations' amax)")
            module.input_global_scale.copy_(input_global_scale.reshape(1))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    @classmethod
    def for_format(cls, fmt: WeightFormat, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                   device: torch.device | str | None, observer: str | None = None,
                   actorder: str | None = None) -> FP4Linear:
        """An empty module of FP4 format ``fmt`` (``WeightFormat.empty_module``); ``actorder`` does
        not apply."""
        return cls(in_features, out_features, scheme=fmt.scheme, bias=bias, dtype=dtype, device=device,
                   observer=observer)

    @classmethod
    def from_result(cls, fmt: WeightFormat, result, *, bias: torch.Tensor | None, dtype: torch.dtype,
                    input_amax: torch.Tensor | None = None, observer: str | None = None,
                    actorder: str | None = None) -> FP4Linear:
        """The module holding a solve's ``result`` (a QuantResult) in format ``fmt``
        (``WeightFormat.pack``). W4A4 takes its static input scale from ``input_amax`` (the
        calibration inputs' max |x|); weight-only formats ignore it, and ``actorder``."""
        input_scale = nvfp4_global_scale(input_amax) if fmt.act_quant and input_amax is not None else None
        return cls.from_codes(result.codes, result.scale, result.global_scale, scheme=fmt.scheme, bias=bias,
                              dtype=dtype, input_global_scale=input_scale, observer=observer)

    @property
    def dtype(self) -> torch.dtype:
        return self.bias.dtype if self.bias is not None else self._dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this module computes with."""
        return fp4_dequant_weight(self.weight_packed, self.weight_scale, self.weight_global_scale,
                                  kind=self.kind, dtype=dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_quant:
            x2 = x.reshape(-1, self.in_features)
            x = nvfp4_fake_quantize_activations(x2, self.input_global_scale).reshape(x.shape)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return fp4_linear(x, self.weight_packed, self.weight_scale, self.weight_global_scale, bias,
                          kind=self.kind, backend=self.backend)

    @property
    def label(self) -> str:
        return self.scheme

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme} "
                f"({self.kind} block {self.group_size}{', W4A4' if self.act_quant else ''}), "
                f"bias={self.bias is not None}, backend={self.backend}")
