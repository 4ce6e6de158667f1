"""Pruning: make weights exactly zero (unstructured, N:M) or remove whole structures (retraining
with LoRA lives in ``compress.lora``, distillation in ``compress.distillation``).

- ``config.py``        MagnitudeConfig, WandaConfig, SparseGPTConfig (one-shot unstructured / N:M)
- ``masks.py``         pure functions: which weights to zero given a score (per row, per layer, N:M)
- ``sparsegpt.py``     the SparseGPT solve (OBS mask selection + weight reconstruction), a pure
                       function sharing GPTQ's Hessian machinery and weight formats
- ``apply.py``         the handler: walks the decoder layers with the calibration engine
- ``structured.py``    StructuredConfig: remove MLP channels, attention heads, whole layers
- ``mlp_layouts.py``   where each family's MLP channels live (gate/up/down, fused gate_up, fc1/fc2, ...)
- ``sparse_linear.py`` Sparse24Linear: the compact 2:4 layout (kept values + 2-bit positions)
"""

from .config import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from .structured import StructuredConfig, StructuredRecord, prune_structured

__all__ = ["MagnitudeConfig", "PruneConfig", "SparseGPTConfig", "WandaConfig", "StructuredConfig",
           "StructuredRecord", "prune_structured"]
