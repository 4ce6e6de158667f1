"""The schemes whose activations are rounded at run time, as tables (other than NVFP4 W4A4, which is a
kind of its own): W8A8 (8-bit weights and activations) and int4 weights with per-token activations
(W4A8 and W4A4 int4). ``compress.formats.WeightFormat`` reads them; its docstring has the spellings.

Plain data, importing nothing from compress: ``compress.formats`` imports this module, and the rest
of ``compress.quant`` depends on ``compress.formats``, not the reverse.
"""

from __future__ import annotations

import re

# The W8A8 schemes: scheme -> (kind, weight_strategy, act_strategy); group_size 128 for the block one.
W8A8_TABLE = {"fp8": ("fp8", "channel", "token"), "fp8-block": ("fp8", "block", "group"),
              "fp8-static": ("fp8", "tensor", "tensor"), "w8a8-int8": ("int", None, "token"),
              "w8a8-int8-static": ("int", None, "tensor")}
W8A8_SCHEMES = tuple(W8A8_TABLE)
# FP8 block scheme: weight scales per W8A8_BLOCK x W8A8_BLOCK block, activation scales per 1 x W8A8_BLOCK.
W8A8_BLOCK = 128

# Int4 symmetric weights per group (or channel) from the config's group_size, stored packed like
# weight-only int4 (QuantLinear), with activations rounded with a dynamic scale per token:
# scheme -> the activation codes (QuantLinear's act_dtype, a kind of compress.kernels.act_quant).
INT4_ACT_TABLE = {"w4a8-int8": "int8", "w4a8-fp8": "fp8", "w4a4-int4": "int4"}
INT4_ACT_SCHEMES = tuple(INT4_ACT_TABLE)
W4A8_SCHEMES = ("w4a8-int8", "w4a8-fp8")             # compressed-tensors' W4A8 and W4AFP8 presets
W4A4_SCHEMES = ("w4a4-int4",)                        # compressed-tensors' W4A4 preset (QuaRot's format)
# Activation bits each code type takes in a compressed-tensors config group (num_bits).
ACT_BITS = {"int8": 8, "fp8": 8, "int4": 4}
INT4_ACT_RE = re.compile(r"^(?P<scheme>w4a8-(?:int8|fp8)|w4a4-int4)(?:-g(?P<g>\d+))?(?P<partial>-partial)?$")
