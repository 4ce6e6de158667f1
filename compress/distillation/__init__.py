"""Distillation: recover what compression lost by matching the uncompressed model (the teacher).

- ``losses.py``   the losses, pure functions on logits / hidden states, with their formulas
- ``config.py``   DistillConfig (method "distill"): LoRA settings plus loss weights and teacher mode
- ``teacher.py``  the teacher's targets: cached once (top-k logits, hidden states) or a live model
- ``apply.py``    the pass: LoRA retraining on the distillation loss, merge / correction / requantize
"""

from .losses import forward_kl, hidden_mse, reverse_kl, topk_kl

__all__ = ["forward_kl", "reverse_kl", "topk_kl", "hidden_mse"]
