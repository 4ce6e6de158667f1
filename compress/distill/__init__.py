"""Distillation: recover what compression lost by matching the uncompressed model (the teacher).

- ``losses.py``  the losses, pure functions on logits / hidden states, with their formulas
"""

from .losses import forward_kl, hidden_mse, reverse_kl, topk_kl

__all__ = ["forward_kl", "reverse_kl", "topk_kl", "hidden_mse"]
