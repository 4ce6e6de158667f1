"""QuantLinear: a linear layer that holds its weight as packed integer codes.

Its buffers carry exactly the compressed-tensors "pack-quantized" tensor names, so the module's
state dict *is* the checkpoint: ``weight_packed`` (int32, [out, ceil(in*bits/32)]),
``weight_scale`` (model dtype, [out, groups]), ``weight_zero_point`` (int32 packed along the
output dimension, [ceil(out*bits/32), groups], asymmetric only), ``weight_shape`` (int64 [2]) and,
for checkpoints quantized with dynamic act-order (``actorder="group"``, older compressed-tensors),
``weight_g_idx`` (int32 [in], the group of each input column).

``backend`` picks the kernel (``compress.kernels.BACKENDS``); ``auto`` runs the fused Triton
kernels on a CUDA GPU and the PyTorch reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError
from ..formats import WeightFormat
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
                 actorder: str | None = None, observer: str | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
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
                   dtype: torch.dtype, actorder: str | None = None, observer: str | None = None) -> QuantLinear:
        """Build from signed codes (out, in), per-group scales and integer zero points (out, groups)."""
        out_features, in_features = codes.shape
        module = cls(in_features, out_features, bits=bits, group_size=group_size,
                     symmetric=zero_point is None, bias=bias is not None, dtype=dtype, device=codes.device,
                     actorder=actorder, observer=observer)
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
                   bias=bias, dtype=dtype, device=device, actorder=actorder, observer=observer)

    @classmethod
    def from_result(cls, fmt: WeightFormat, result, *, bias: torch.Tensor | None, dtype: torch.dtype,
                    input_amax: torch.Tensor | None = None, observer: str | None = None,
                    actorder: str | None = None) -> QuantLinear:
        """The module holding a solve's ``result`` (a QuantResult) in format ``fmt``
        (``WeightFormat.pack``); ``input_amax`` does not apply (weight-only format)."""
        if (result.zero_point is None) != fmt.symmetric:
            raise ValueError(f"{fmt} is {'' if fmt.symmetric else 'a'}symmetric, but the solve "
                             f"{'returned' if result.zero_point is not None else 'has no'} zero points")
        return cls.from_codes(result.codes, result.scale, result.zero_point, bits=fmt.bits, group_size=fmt.group_size,
                              bias=bias, dtype=dtype, actorder=actorder, observer=observer)

    @property
    def weight_format(self) -> WeightFormat:
        """This layer's format; ``partial_groups`` when its last group is narrower."""
        partial = self.group_size is not None and self.in_features % self.group_size != 0
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
        return dequant_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point, bias,
                              bits=self.bits, group_size=self.group_size, in_features=self.in_features,
                              g_idx=self.weight_g_idx, backend=self.backend)

    @property
    def label(self) -> str:
        return f"int{self.bits} {'ch' if self.group_size is None else f'g{self.group_size}'}"

    def extra_repr(self) -> str:
        group = "channel" if self.group_size is None else f"group_size={self.group_size}"
        kind = "sym" if self.symmetric else "asym"
        gidx = ", g_idx" if self.weight_g_idx is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"int{self.bits} {kind} {group}{gidx}, bias={self.bias is not None}, backend={self.backend}")

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
