"""W8A8Linear: a linear layer with FP8 E4M3 or INT8 weights whose activations are quantized too.

Buffers carry exactly the compressed-tensors ``float-quantized`` / ``int-quantized`` tensor names, so
the module's state dict *is* the checkpoint:

- ``weight``        float8_e4m3fn (fp8 schemes) or int8 (w8a8-int8 schemes), (out, in): the codes;
- ``weight_scale``  model dtype: (out, 1) per output channel (fp8, w8a8-int8*), (1,) per tensor
                    (fp8-static), (ceil(out/128), ceil(in/128)) per block (fp8-block);
- ``input_scale``   model dtype (1,), the static per-tensor activation scale (fp8-static,
                    w8a8-int8-static): ``amax / 448`` (FP8) or ``amax / 127`` (INT8) of the
                    calibration inputs, as vLLM computes dynamic ones;
- ``bias``          Parameter in the model dtype, optional.

The forward pass quantizes the activations (per token, per 1x128 group or with ``input_scale``) and
runs ``compress.kernels.w8a8_linear.w8a8_linear`` (``backend``): a simulation on any device, the
native FP8 / INT8 GEMMs on a GPU that has them.
"""

from __future__ import annotations

import torch
from torch import nn

from ..formats import W8A8_BLOCK, W8A8_SCHEMES, WeightFormat
from ..kernels.act_quant import scale_from_amax
from ..kernels.w8a8_linear import w8a8_dequant_weight, w8a8_linear
from .packed import PackedLinear


class W8A8Linear(PackedLinear):
    def __init__(self, in_features: int, out_features: int, *, scheme: str, bias: bool = False,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None,
                 backend: str = "auto", observer: str | None = None, actorder: str | None = None):
        super().__init__()
        if scheme not in W8A8_SCHEMES:
            raise ValueError(f"W8A8Linear scheme must be one of {', '.join(W8A8_SCHEMES)}, got {scheme!r}")
        fmt = WeightFormat.from_scheme(scheme)
        self.weight_format, self.scheme = fmt, scheme
        self.in_features, self.out_features = in_features, out_features
        self.kind = "fp8" if fmt.kind == "fp8" else "int8"         # the kernels' name of the codes
        self.act = fmt.act_strategy                                 # token | group | tensor
        self.weight_strategy = fmt.weight_strategy or "channel"     # channel | tensor | block
        self.block = W8A8_BLOCK if self.weight_strategy == "block" else None
        self.backend = backend
        # What reports read; provenance written into the checkpoint config (does not change the math).
        self.bits, self.group_size, self.symmetric = 8, fmt.group_size, True
        self.observer, self.actorder = observer, actorder
        codes_dtype = torch.float8_e4m3fn if self.kind == "fp8" else torch.int8
        self.register_buffer("weight", torch.zeros(out_features, in_features, device=device).to(codes_dtype))
        self.register_buffer("weight_scale", torch.ones(self._scale_shape(), dtype=dtype, device=device))
        if self.act == "tensor":
            self.register_buffer("input_scale", torch.ones(1, dtype=dtype, device=device))
        else:
            self.input_scale = None
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    def _scale_shape(self) -> tuple[int, ...]:
        if self.weight_strategy == "tensor":
            return (1,)
        if self.weight_strategy == "block":
            return (-(-self.out_features // W8A8_BLOCK), -(-self.in_features // W8A8_BLOCK))
        return (self.out_features, 1)

    def stored_scale(self, scale: torch.Tensor) -> torch.Tensor:
        """A solve's per-row scales (rows, groups) in the stored shape: (out, 1), (1,) or one row
        per 128-row block."""
        if self.weight_strategy == "tensor":
            return scale.reshape(-1)[:1]
        if self.weight_strategy == "block":
            return scale[::W8A8_BLOCK]
        return scale.reshape(self.out_features, 1)

    @classmethod
    def for_format(cls, fmt: WeightFormat, in_features: int, out_features: int, *, bias: bool, dtype: torch.dtype,
                   device: torch.device | str | None, observer: str | None = None,
                   actorder: str | None = None) -> W8A8Linear:
        """An empty module of W8A8 format ``fmt`` (``WeightFormat.empty_module``)."""
        return cls(in_features, out_features, scheme=fmt.scheme, bias=bias, dtype=dtype, device=device,
                   observer=observer, actorder=actorder)

    @classmethod
    def from_result(cls, fmt: WeightFormat, result, *, bias: torch.Tensor | None, dtype: torch.dtype,
                    input_amax: torch.Tensor | None = None, observer: str | None = None,
                    actorder: str | None = None) -> W8A8Linear:
        """The module holding a solve's ``result`` (a QuantResult of one module's rows: FP8 or int8
        codes, per-row scales) in format ``fmt`` (``WeightFormat.pack``). Static schemes take
        ``input_scale`` from ``input_amax``, the calibration inputs' max |x|."""
        out_features, in_features = result.codes.shape
        module = cls.for_format(fmt, in_features, out_features, bias=bias is not None, dtype=dtype,
                                device=result.codes.device, observer=observer, actorder=actorder)
        module._fill(result, bias)
        if module.input_scale is not None:
            if input_amax is None:
                raise ValueError(f"{fmt} quantizes activations with a static scale: it needs input_amax "
                                 f"(max |x| of the calibration inputs)")
            module.input_scale.copy_(scale_from_amax(input_amax.reshape(1), module.kind).to(dtype))
        return module

    def _fill(self, result, bias: torch.Tensor | None) -> None:
        """Copy a solve's codes, scales (stored shape, model dtype) and ``bias`` in."""
        if result.codes.dtype != self.weight.dtype:
            raise ValueError(f"{self.scheme} stores {self.weight.dtype} codes, the solve returned {result.codes.dtype}")
        self.weight.copy_(result.codes)
        self.weight_scale.copy_(self.stored_scale(result.scale.float()).to(self.dtype))
        if bias is not None:
            self.bias.data.copy_(bias.detach().to(self.dtype))

    def requantized(self, weight: torch.Tensor) -> W8A8Linear:
        """A new module holding ``weight`` (out, in) rounded to nearest on this module's format with
        fresh weight scales (its observer), keeping its static ``input_scale`` (distillation's
        ``requantize_adapters``)."""
        grid = self.weight_format.solver_grid(self.dtype, self.observer or "minmax")
        w = weight.float()
        params = grid.fit(w, None)                      # round to nearest (rtn_solve's steps: rtn imports this module)
        codes, deq = grid.quantize(w, params)
        new = self.for_format(self.weight_format, self.in_features, self.out_features, bias=self.bias is not None,
                              dtype=self.dtype, device=weight.device, observer=self.observer, actorder=self.actorder)
        new._fill(grid.result(codes, params, deq, float((deq - w).pow(2).sum())), self.bias)
        if self.input_scale is not None:
            new.input_scale.copy_(self.input_scale)
        new.backend = self.backend
        return new

    @property
    def dtype(self) -> torch.dtype:
        return self.weight_scale.dtype

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense (out, in) weight this module computes with."""
        return w8a8_dequant_weight(self.weight, self.weight_scale, block=self.block, dtype=dtype or self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return w8a8_linear(x, self.weight, self.weight_scale, self.input_scale, bias, kind=self.kind, act=self.act,
                           block=self.block, group_size=W8A8_BLOCK, backend=self.backend)

    @property
    def label(self) -> str:
        return self.scheme

    def extra_repr(self) -> str:
        acts = {"token": "dynamic per token", "group": f"dynamic per 1x{W8A8_BLOCK}", "tensor": "static per tensor"}
        weights = {"channel": "per channel", "tensor": "per tensor", "block": f"{W8A8_BLOCK}x{W8A8_BLOCK} blocks"}
        return (f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme} "
                f"({self.kind} weights {weights[self.weight_strategy]}, {self.kind} activations {acts[self.act]}), "
                f"bias={self.bias is not None}, backend={self.backend}")
