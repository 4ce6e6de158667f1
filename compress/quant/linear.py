"""QuantLinear: a linear layer that holds its weight as packed integer codes.

Its buffers carry exactly the compressed-tensors "pack-quantized" tensor names, so the module's
state dict *is* the checkpoint: ``weight_packed`` (int32, [out, ceil(in*bits/32)]),
``weight_scale`` (model dtype, [out, groups]), ``weight_zero_point`` (int32 packed along the
output dimension, [ceil(out*bits/32), groups], asymmetric only), ``weight_shape`` (int64 [2]) and,
for checkpoints quantized with dynamic act-order (``actorder="group"``, older compressed-tensors),
``weight_g_idx`` (int32 [in], the group of each input column).

``backend`` picks the kernel (``compress.kernels.BACKENDS``); ``auto`` runs the fused Triton
kernels on a CUDA GPU and the PyTorch reference elsewhere.

W4A8 (``act_dtype`` "int8" or "fp8", the schemes w4a8-int8 / w4a8-fp8) and W4A4 int4 (``act_dtype``
"int4", w4a4-int4): the same int4 storage, and the forward pass first rounds each token (row) of the
input to INT8, FP8 E4M3 or INT4 codes with a dynamic symmetric scale (``compress.kernels.act_quant``,
the W8A8 layers' activation quantizer), then runs the int4 matmul on the codes and multiplies each
output row by its token's scale, as a W4A8 / W4A4 kernel's epilogue does: ``y[t] = s[t] * (codes[t]
@ W^T) + b``. The codes are exact in bf16/fp16/fp32 (|int8| <= 128, E4M3 has 3 mantissa bits), so
this equals fake-quantized activations times the int4 weight up to float rounding. On a GPU the
activation codes come from the fused Triton quantizer and the matmul from the int4 Triton kernel (a
simulation of the int8/fp8/int4 tensor-core GEMM, not it).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats import INT4_ACT_SCHEMES, WeightFormat
from ..kernels.act_quant import ACT_DTYPES, quantize_activations
from ..kernels.dequant_linear import dequant_linear, dequant_weight
from ..kernels.packing import pack_int32, packed_words
from .grid import num_groups
from .packed import PackedLinear

# actorder values whose checkpoints carry a per-column group index (``weight_g_idx``).
DYNAMIC_ACTORDER = ("group", "dynamic")


class QuantLinear(PackedLinear):
    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int | None,
                 symmetric: bool, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, backend: str = "auto",
                 actorder: str | None = None, observer: str | None = None, act_dtype: str | None = None):
        super().__init__()
        if act_dtype is not None and (act_dtype not in ACT_DTYPES or bits != 4 or not symmetric):
            raise ValueError(f"W4A8 / W4A4 ({', '.join(INT4_ACT_SCHEMES)}) round activations to int8, fp8 or int4 over "
                             f"int4 symmetric weights; got act_dtype={act_dtype!r}, bits={bits}, symmetric={symmetric}")
        self.in_features, self.out_features = in_features, out_features
        # W4A8 / W4A4: the codes each token is rounded to before the matmul ("int8" | "fp8" | "int4");
        # None = weight-only.
        self.act_dtype = act_dtype
        self.bits, self.group_size, self.symmetric = bits, group_size, symmetric
        self.backend = backend
        # Provenance written into the checkpoint config; it does not change the computation.
        self.actorder, self.observer = actorder, observer
        groups = num_groups(in_features, group_size)
        if actorder in DYNAMIC_ACTORDER:
            self.register_buffer("weight_g_idx", torch.arange(in_features, dtype=torch.int32, device=device)
                                 // (group_size or in_features))
        else:
            self.weight_g_idx = None
        self.register_buffer("weight_packed", torch.zeros(
            out_features, packed_words(in_features, bits), dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, dtype=dtype, device=device))
        if symmetric:
            self.weight_zero_point = None
        else:
            self.register_buffer("weight_zero_point", torch.zeros(
                packed_words(out_features, bits), groups, dtype=torch.int32, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_codes(cls, codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, *,
                   bits: int, group_size: int | None, bias: torch.Tensor | None,
                   dtype: torch.dtype, actorder: str | None = None, observer: str | None = None,
                   act_dtype: str | None = None) -> QuantLinear:
        """Build from signed codes (out, in), per-group scales and integer zero points (out, groups)."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits=bits, group_size=group_size,
                     symmetric=zero_point is None, bias=bias is not None, dtype=dtype, device=codes.device,
                     actorder=actorder, observer=observer, act_dtype=act_dtype)
        module.weight_packed.copy_(pack_int32(codes, bits))
        module.weight_scale.copy_(scale.to(dtype))
        if zero_point is not None:
            module.weight_zero_point.copy_(pack_int32(zero_point.round().to(torch.int8), bits, dim=0))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    @classmethod
    def for_format(cls, fmt: WeightFormat, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                   device: torch.device | str | None, observer: str | None = None,
                   actorder: str | None = None) -> QuantLinear:
        """An empty module of integer format ``fmt`` (``WeightFormat.empty_module``)."""
        return cls(in_features, out_features, bits=fmt.bits, group_size=fmt.group_size, symmetric=fmt.symmetric,
                   bias=bias, dtype=dtype, device=device, actorder=actorder, observer=observer, act_dtype=fmt.act_dtype)

    @classmethod
    def from_result(cls, fmt: WeightFormat, result, *, bias: torch.Tensor | None, dtype: torch.dtype,
                    input_amax: torch.Tensor | None = None, observer: str | None = None,
                    actorder: str | None = None) -> QuantLinear:
        """The module holding a solve's ``result`` (a QuantResult) in format ``fmt``
        (``WeightFormat.pack``); ``input_amax`` does not apply (weight-only, or W4A8/W4A4's dynamic scales)."""
        if (result.zero_point is None) != fmt.symmetric:
            raise ValueError(f"{fmt} is {'' if fmt.symmetric else 'a'}symmetric, but the solve "
                             f"{'returned' if result.zero_point is not None else 'has no'} zero points")
        return cls.from_codes(result.codes, result.scale, result.zero_point, bits=fmt.bits, group_size=fmt.group_size,
                              bias=bias, dtype=dtype, actorder=actorder, observer=observer, act_dtype=fmt.act_dtype)

    @property
    def weight_format(self) -> WeightFormat:
        """This layer's format; ``partial_groups`` when its last group is narrower."""
        partial = self.group_size is not None and self.in_features % self.group_size != 0
        if self.act_dtype is not None:
            return WeightFormat("int", self.bits, self.group_size, self.symmetric, act_quant=True, partial_groups=partial,
                                act_strategy="token", act_dtype=self.act_dtype)
        return WeightFormat("int", self.bits, self.group_size, self.symmetric, partial_groups=partial)

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this module computes with."""
        return dequant_weight(self.weight_packed, self.weight_scale, self.weight_zero_point, self.bits,
                              self.group_size, self.in_features, dtype or self.dtype, self.weight_g_idx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if self.act_dtype is not None:
            return self._forward_w4a8(x, bias)
        return dequant_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point, bias,
                              bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                              g_idx=self.weight_g_idx, backend=self.backend)

    def _forward_w4a8(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """Round each token to ``act_dtype`` codes, int4 matmul on the codes, scale each output row."""
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])                                                   # (M, K)
        codes, scale = quantize_activations(x2, self.act_dtype, "token", backend=self.backend)  # (M, K), (M, 1)
        # Unscaled outputs grow by 1/s (up to 448/amax per token): past fp16's 65504, not bf16's range.
        mm_dtype = torch.float32 if x.dtype == torch.float16 else x.dtype
        y = dequant_linear(codes.to(mm_dtype), self.weight_packed, self.weight_scale, self.weight_zero_point, None,
                           bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                           g_idx=self.weight_g_idx, backend=self.backend)              # (M, N)
        y = y.float() * scale.float()
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    @property
    def label(self) -> str:
        if self.act_dtype is not None:
            return str(self.weight_format)
        return f"int{self.bits} {'ch' if self.group_size is None else f'g{self.group_size}'}"

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"group_size={self.group_size}"
        kind = "sym" if self.symmetric else "asym"
        gidx = ", g_idx" if self.weight_g_idx is not None else ""
        acts = f", {self.act_dtype} activations dynamic per token" if self.act_dtype is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} {kind} {group}{gidx}{acts}, bias={self.bias is not None}, backend={self.backend}")

    def check_g_idx(self, name: str) -> None:
        """Refuse a loaded ``weight_g_idx`` that points outside the scale table."""
        if self.weight_g_idx is None:
            return
        g, groups = self.weight_g_idx, self.weight_scale.shape[1]
        if g.shape != (self.in_features,) or g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
            raise CheckpointError(f"{name}.weight_g_idx must hold {self.in_features} group indices in "
                                  f"[0, {groups}); got shape {tuple(g.shape)}, range "
                                  f"[{int(g.min()) if g.numel() else '-'}, {int(g.max()) if g.numel() else '-'}]. "
                                  f"The checkpoint is damaged; re-export it")
