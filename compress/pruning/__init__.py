"""Pruning: make weights exactly zero (unstructured, N:M) or remove whole structures (retraining
with LoRA lives in ``compress.lora``, distillation in ``compress.distillation``).

- ``config.py``        MagnitudeConfig, WandaConfig, SparseGPTConfig (one-shot unstructured / N:M)
- ``masks.py``         pure functions: which weights to zero given a score (per row, per layer, N:M)
- ``sparsegpt.py``     the SparseGPT solve (OBS mask selection + weight reconstruction), a pure
                       function sharing GPTQ's Hessian machinery and weight formats
- ``apply.py``         the handler: walks the decoder layers with the calibration engine
- ``structured.py``    StructuredConfig: remove MLP channels, attention heads, whole layers
- ``minitron.py``      MinitronConfig: hidden size + MLP width (+ heads) to a parameter target (Minitron)
- ``adapt.py``         AdaptConfig: per-layer adaptive MLP widths, pruned incrementally with training
- ``dsnot.py``         DSnoTConfig: training-free prune-and-grow swaps refining a Wanda / magnitude mask
- ``gblm.py``          GBLMConfig: GBLM-Pruner, |W| * (alpha * gradient l2 norm + ||X||)
- ``mlp_layouts.py``   where each family's MLP channels live (gate/up/down, fused gate_up, fc1/fc2, ...)
- ``sparse_linear.py`` Sparse24Linear: the compact 2:4 layout (kept values + 2-bit positions)
"""

from .config import MagnitudeConfig, PruneConfig, SparseGPTConfig, WandaConfig
from .structured import StructuredConfig, StructuredRecord, prune_structured
from .minitron import MinitronConfig, prune_width
from .adapt import AdaptConfig, prune_adaptive
from .dsnot import DSnoTConfig, prune_dsnot
from .gblm import GBLMConfig, prune_gblm

__all__ = ["MagnitudeConfig", "PruneConfig", "SparseGPTConfig", "WandaConfig", "StructuredConfig",
           "StructuredRecord", "prune_structured", "MinitronConfig", "prune_width", "AdaptConfig", "prune_adaptive",
           "DSnoTConfig", "prune_dsnot", "GBLMConfig", "prune_gblm"]
