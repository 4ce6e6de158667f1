"""The config of the rotation pass (QuaRot / SpinQuant-style orthogonal rotations; docs/rotation.md).

A recipe pass that runs *before* quantization (``rotate -> gptq(nvfp4)``). It multiplies weights
by orthogonal matrices so that the float model computes what it computed before (to float
rounding) while weights and activations lose their outlier channels, which is what 4-bit
activations (NVFP4 W4A4) and 4-bit weights need.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ..configs import MethodConfig
from ..errors import ConfigError


@dataclasses.dataclass
class RotationConfig(MethodConfig):
    """Which rotations to apply; names as in SpinQuant (R1, R2, R4).

    residual:  R1, the residual stream (hidden size), folded offline into every weight that reads
               or writes it: the norms' scales go into the linears they feed (norm weights become 1),
               embeddings and the linears that read the stream are multiplied by Q, the ones that
               write it (o_proj, down_proj) by Q^T. "random-hadamard": Q = H diag(+-1) (QuaRot);
               "hadamard": Q = H; "random": a random orthogonal matrix (any size); null: none.
               Tied embeddings are untied (lm_head gets its own weight: vocab x hidden more parameters).
    residual_block: R1 as a block-diagonal rotation with blocks of this power of two (dividing the
               hidden size): mixes channels only inside each block, e.g. 16 = NVFP4's scale block
               (what the NVFP4 training recipe rotates); null: one rotation of the full hidden size.
    heads:     R2, a Hadamard of head_dim on each head of v_proj's output and o_proj's input
               (offline; needs a power-of-two head_dim).
    down_proj: R4, a Hadamard on the input of each down_proj: its weight is multiplied offline, its
               input online (a hook that survives quantization); the activation outliers of the
               MLP's product are what W4A4 suffers from most. The checkpoint then records the
               online transform (docs/rotation.md says which engines apply it).
    down_proj_block: R4's Hadamard is block-diagonal with blocks of this power of two (it must divide
               the MLP width): what compressed-tensors stores as type "hadamard" with head_dim = block
               and vLLM applies (128 also suits its fused NVFP4 path). null: one Hadamard of the full
               width (a Paley construction where one exists; compress's runtime only).
    seed:      the random signs of "random-hadamard" / the random matrix of "random".
    """

    method = "rotate"
    residual: Literal["random-hadamard", "hadamard", "random"] | None = "random-hadamard"
    residual_block: int | None = None
    heads: bool = True
    down_proj: bool = True
    down_proj_block: int | None = 128
    seed: int = 0

    def validate(self) -> None:
        if self.residual not in ("random-hadamard", "hadamard", "random", None):
            raise ConfigError(f"residual must be 'random-hadamard', 'hadamard', 'random' or null, got {self.residual!r}")
        if self.residual is None and not self.heads and not self.down_proj:
            raise ConfigError("rotate: residual is null and heads and down_proj are false: nothing to rotate")
        r = self.residual_block
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 1 or r & (r - 1)):
            raise ConfigError(f"residual_block must be a power of two >= 2 or null (the full hidden size), got {r!r}")
        b = self.down_proj_block
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b <= 0 or b & (b - 1)):
            raise ConfigError(f"down_proj_block must be a power of two or null (the full width), got {b!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")


__all__ = ["RotationConfig"]
