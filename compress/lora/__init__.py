"""LoRA retraining: low-rank adapters (plus norms and biases) trained on calibration text and merged
back under the sparsity mask (PERP), or kept as a low-rank correction of a quantized layer.
Pruning's recovery pass and distillation both train through this package; neither is imported here.

- ``adapters.py``     LoRAConfig (method "lora"), the LoRALinear module, wrapping and the merge math
- ``train.py``        the training loop (``retrain``) and the "lora" pass (``lora_retrain``)
- ``train_state.py``  resumable training: adapters, optimizer, step and RNG saved every N steps
"""

from .adapters import LoRAConfig, LoRALinear, merge_lora, unwrap_lora, wrap_lora
from .train import RetrainResult, lora_retrain, retrain

__all__ = ["LoRAConfig", "LoRALinear", "merge_lora", "unwrap_lora", "wrap_lora", "RetrainResult", "lora_retrain",
           "retrain"]
