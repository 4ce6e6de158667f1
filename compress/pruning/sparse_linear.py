"""Sparse24Linear: a linear layer holding a 2:4 sparse weight in the compact layout.

Its buffers are the layout's tensors (docs/sparse-format.md, "compress 2:4 compact layout,
version 1"), so the module's state dict *is* the checkpoint:

- float values (``bits=None``): ``weight_values`` (out, in/2) in the model dtype, ``weight_meta``
  uint8 (out, in/8), ``weight_shape`` int64 [out, in];
- int4 (``bits=4``): ``weight_packed`` int32 (out, ceil(in/16)) symmetric codes of the kept values,
  ``weight_scale`` (out, groups) in the model dtype over the original input columns,
  ``weight_meta`` and ``weight_shape`` as above;
- ``bias`` (out,) when the layer has one.

A bf16 layer stores in/2 * 2 + in/8 bytes per row, 56% of the dense in * 2; int4 g128, in/4 +
in/8 + in/64 bytes per row, 20%. ``backend`` picks the kernel (``compress.kernels.BACKENDS``): the
fused Triton kernel on a CUDA GPU under ``auto``, the PyTorch reference elsewhere.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..kernels.dequant_linear import check_backend
from ..kernels.packing import pack_int32, packed_words
from ..kernels.sparse24_linear import (BITS, check_group_size, check_meta, check_shape, pack_24, quantize_24,
                                       sparse24_linear, sparse24_weight)
from ..quant.grid import compute_qparams, num_groups
from ..quant.packed import PackedLinear

SHORT_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
DEFAULT_META = 0x44          # positions (0, 1) in both groups of a byte: what pack_24 writes for zeros


# Quantizing a 2:4 weight chooses scales, so it sits here (above compress.quant.grid), not beside the
# kernel's layout functions, which only read codes and scales.
def int4_scales(weight: torch.Tensor, group_size: int | None,
                scale_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Round-to-nearest symmetric int4 scales (out, groups) in ``scale_dtype`` (default: the weight's),
    ``compress.quant.grid``'s formula on the dense weight: amax of each group of original columns
    over 7 (the dropped entries are zeros and change no amax)."""
    out, cols = weight.shape
    check_shape(out, cols)
    check_group_size(cols, group_size)
    dtype = scale_dtype or weight.dtype
    scale, _ = compute_qparams(weight.detach().float(), 4, group_size, True, dtype)
    return scale.to(dtype)


def quantize_24_int4(weight: torch.Tensor, group_size: int | None,
                     scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed int32 (out, ceil(in/16)), scale (out, groups), meta uint8 (out, in/8)) of a 2:4 sparse
    ``weight``: round-to-nearest on ``int4_scales`` unless ``scale`` is given."""
    values, meta = pack_24(weight)
    cols = weight.shape[1]
    if scale is None:
        scale = int4_scales(weight, group_size)
    elif tuple(scale.shape) != (weight.shape[0], num_groups(cols, group_size)):
        raise ConfigError(f"2:4 int4 scales must have shape (out, groups) = "
                          f"{(weight.shape[0], num_groups(cols, group_size))}; got {tuple(scale.shape)}")
    codes = quantize_24(values, meta, scale, group_size, cols)
    return pack_int32(codes, 4), scale, meta


class Sparse24Linear(PackedLinear):
    # Not a compressed-tensors module: checkpoints describe it in config.json["compress_sparsity"].
    sparse_layout = True

    def __init__(self, in_features: int, out_features: int, *, bits: int | None = None,
                 group_size: int | None = None, bias: bool = False, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None, backend: str = "auto"):
        super().__init__()
        check_shape(out_features, in_features)
        if bits not in BITS:
            raise ConfigError(f"Sparse24Linear holds float values (bits=None) or int4 codes (bits=4), not "
                              f"bits={bits}")
        if bits is None and group_size is not None:
            raise ConfigError(f"group_size={group_size} needs bits=4: float 2:4 values have no scales")
        if bits is not None:
            check_group_size(in_features, group_size)
        if dtype not in SHORT_DTYPE:
            raise ConfigError(f"Sparse24Linear stores float32, float16 or bfloat16 values, not {dtype}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.backend = check_backend(backend)
        self._dtype = dtype
        if bits is None:
            self.register_buffer("weight_values", torch.zeros(out_features, in_features // 2, dtype=dtype,
                                                              device=device))
            self.weight_packed = self.weight_scale = None
        else:
            self.weight_values = None
            self.register_buffer("weight_packed", torch.zeros(out_features, packed_words(in_features // 2, 4),
                                                              dtype=torch.int32, device=device))
            self.register_buffer("weight_scale", torch.ones(out_features, num_groups(in_features, group_size),
                                                            dtype=dtype, device=device))
        self.register_buffer("weight_meta", torch.full((out_features, in_features // 8), DEFAULT_META,
                                                       dtype=torch.uint8, device=device))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64,
                                                          device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @classmethod
    def from_dense(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *, bits: int | None = None,
                   group_size: int | None = None, dtype: torch.dtype | None = None,
                   backend: str = "auto") -> Sparse24Linear:
        """From a 2:4 sparse dense ``weight`` (out, in); ``bits=4`` rounds the kept values to nearest on
        symmetric int4 scales (amax / 7 per group of original columns, ``compress.quant.grid``)."""
        dtype = dtype or weight.dtype
        w = weight.detach().to(dtype)
        values, meta = pack_24(w)
        if bits is None:
            return cls.from_parts(meta, values=values, bias=bias, dtype=dtype, backend=backend)
        if bits != 4:
            raise ConfigError(f"Sparse24Linear holds float values (bits=None) or int4 codes (bits=4), not bits={bits}")
        check_group_size(w.shape[1], group_size)
        scale = int4_scales(w, group_size)
        codes = quantize_24(values, meta, scale, group_size, w.shape[1])
        return cls.from_parts(meta, codes=codes, scale=scale, group_size=group_size, bias=bias, dtype=dtype,
                              backend=backend)

    @classmethod
    def from_parts(cls, meta: torch.Tensor, *, values: torch.Tensor | None = None, codes: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, group_size: int | None = None,
                   bias: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                   backend: str = "auto") -> Sparse24Linear:
        """From the layout's parts: ``meta`` uint8 (out, in/8) and either the kept ``values`` (out, in/2)
        or signed int4 ``codes`` (out, in/2, integers in -8..7) with their ``scale`` (out, groups):
        what a GPTQ-style solve on the kept entries hands over."""
        if (values is None) == (codes is None):
            raise ConfigError("Sparse24Linear.from_parts takes either values= (float mode) or codes= with scale= "
                              "(int4), not both or neither")
        out_features, in_features = meta.shape[0], 8 * meta.shape[1]
        if codes is not None and scale is None:
            raise ConfigError("int4 codes need their scale= (out, groups)")
        kept = values if values is not None else codes
        if tuple(kept.shape) != (out_features, in_features // 2):
            raise ConfigError(f"2:4 {'values' if values is not None else 'codes'} must have shape (out, in/2) = "
                              f"{(out_features, in_features // 2)} to match meta {tuple(meta.shape)}; got "
                              f"{tuple(kept.shape)}")
        dtype = dtype or (values.dtype if values is not None else scale.dtype)
        module = cls(in_features, out_features, bits=None if codes is None else 4, group_size=group_size,
                     bias=bias is not None, dtype=dtype, device=meta.device, backend=backend)
        module.weight_meta.copy_(meta)
        if values is not None:
            module.weight_values.copy_(values.detach())
        else:
            if codes.is_floating_point() and not torch.equal(codes, codes.round()):
                raise ConfigError("int4 codes must be integers in -8..7; got non-integer values")
            module.weight_packed.copy_(pack_int32(codes.to(torch.int64), 4))
            if tuple(scale.shape) != tuple(module.weight_scale.shape):
                raise ConfigError(f"2:4 int4 scales must have shape (out, groups) = {tuple(module.weight_scale.shape)}"
                                  f" for group_size={group_size}; got {tuple(scale.shape)}")
            module.weight_scale.copy_(scale.detach().to(dtype))
        if bias is not None:
            module.bias.data.copy_(bias.detach().to(dtype))
        return module

    @property
    def dtype(self) -> torch.dtype:
        return self._dtype

    def _weight_tensors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.bits is None:
            return self.weight_values, None
        return self.weight_packed, self.weight_scale

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this module computes with."""
        kept, scale = self._weight_tensors()
        return sparse24_weight(kept, self.weight_meta, scale, in_features=self.in_features,
                               group_size=self.group_size, bits=self.bits, dtype=dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, scale = self._weight_tensors()
        bias = None if self.bias is None else self.bias.to(x.dtype)
        # The dispatcher flattens leading dimensions to (M, in) and restores them.
        return sparse24_linear(x, kept, self.weight_meta, scale, bias, in_features=self.in_features,
                               group_size=self.group_size, bits=self.bits, backend=self.backend)

    @property
    def label(self) -> str:
        if self.bits is None:
            return f"2:4 {SHORT_DTYPE[self.dtype]}"
        return f"2:4 int4 {'ch' if self.group_size is None else f'g{self.group_size}'}"

    def extra_repr(self) -> str:
        kind = (f"values {SHORT_DTYPE[self.dtype]}" if self.bits is None else
                f"int4 sym {'channel' if self.group_size is None else f'group_size={self.group_size}'}")
        return (f"in_features={self.in_features}, out_features={self.out_features}, 2:4 {kind}, "
                f"bias={self.bias is not None}, backend={self.backend}")

    def check_meta(self, name: str) -> None:
        """Refuse loaded metadata that ``pack_24`` could not have written (a group whose kept
        positions are not idx0 < idx1)."""
        reason = check_meta(self.weight_meta)
        if reason is not None:
            raise CheckpointError(f"{name}.weight_meta is not a 2:4 compact layout (version 1): {reason}. "
                                  f"The checkpoint is damaged; re-export it")
