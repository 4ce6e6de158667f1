"""Distillation losses: pure functions on (..., vocab) logits and (..., hidden) states.

With p = softmax(teacher / T) and q = softmax(student / T) over the vocabulary, per token:

- forward KL:  KL(p || q) = sum_v p_v (log p_v - log q_v)   mode-covering: the student spreads its
  mass wherever the teacher has any (the usual knowledge-distillation loss, Hinton et al.);
- reverse KL:  KL(q || p) = sum_v q_v (log q_v - log p_v)   mode-seeking: the student concentrates
  on the teacher's main modes (MiniLLM);
- top-k KL:    forward KL restricted to the teacher's k most likely tokens plus one "rest" bucket
  holding the remaining mass of each distribution, so a cached teacher needs k values and k indices
  per token instead of the whole vocabulary (49k for SmolLM2, 128k for Llama 3);
- hidden MSE:  mean over tokens of ||h_s - h_t||^2 / mean(h_t^2), the student's hidden state against
  the teacher's at the same layer, normalized so that layers of different scale weigh alike.

KL losses are multiplied by T^2 so their gradients keep their size as the temperature changes, and
averaged over the tokens where ``mask`` (the attention mask, optional) is true.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ConfigError


def _check(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> None:
    if student.shape != teacher.shape:
        raise ConfigError(f"student and teacher shapes differ: {tuple(student.shape)} vs {tuple(teacher.shape)}; "
                          f"distil models with the same vocabulary / hidden size")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return per_token.mean()
    mask = mask.to(per_token.dtype)
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over tokens of KL(softmax(teacher/T) || softmax(student/T))."""
    _check(student, teacher, temperature)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
    return temperature ** 2 * _token_mean(per_token, mask)


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, *, temperature: float = 1.0,
               mask: torch.Tensor | None = None) -> torch.Tensor:
    """T^2 * mean over tokens of KL(softmax(student/T) || softmax(teacher/T))."""
    _check(student, teacher, temperature)
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1)
    return temperature ** 2 * _token_mean(per_token, mask)


def topk_kl(student: torch.Tensor, teacher_values: torch.Tensor, teacher_indices: torch.Tensor, *,
            temperature: float = 1.0, teacher_logsumexp: torch.Tensor | None = None,
            mask: torch.Tensor | None = None) -> torch.Tensor:
    """Forward KL over the teacher's top-k tokens plus a "rest" bucket.

    student:            (..., vocab) logits
    teacher_values:     (..., k) the teacher's k largest logits, teacher_indices (..., k) their tokens
    teacher_logsumexp:  (...,) logsumexp(teacher / T) over the whole vocabulary, so the rest bucket
                        gets the teacher's true remaining mass; None = the top k hold all of it.
    """
    if teacher_values.shape != teacher_indices.shape or teacher_values.shape[:-1] != student.shape[:-1]:
        raise ConfigError(f"top-k teacher values {tuple(teacher_values.shape)} and indices "
                          f"{tuple(teacher_indices.shape)} must be (..., k) over the student's tokens "
                          f"{tuple(student.shape[:-1])}")
    if not temperature > 0:
        raise ConfigError(f"temperature must be positive, got {temperature}")
    log_q_all = F.log_softmax(student.float() / temperature, dim=-1)
    log_q = log_q_all.gather(-1, teacher_indices.long())                         # (..., k)
    t = teacher_values.float() / temperature
    norm = torch.logsumexp(t, dim=-1) if teacher_logsumexp is None else teacher_logsumexp.float()
    log_p = t - norm.unsqueeze(-1)
    p = log_p.exp()
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - log_q.exp().sum(-1)).clamp_min(1e-12)
    per_token = (p * (log_p - log_q)).sum(-1) + torch.xlogy(p_rest, p_rest) - p_rest * q_rest.log()
    return temperature ** 2 * _token_mean(per_token, mask)


def hidden_mse(student: torch.Tensor, teacher: torch.Tensor, *, mask: torch.Tensor | None = None) -> torch.Tensor:
    """mean over tokens of ||h_s - h_t||^2 / mean(h_t^2): scale-free across layers."""
    _check(student, teacher, 1.0)
    s, t = student.float(), teacher.float()
    per_token = (s - t).square().mean(-1)
    return _token_mean(per_token, mask) / _token_mean(t.square().mean(-1), mask).clamp_min(1e-12)
