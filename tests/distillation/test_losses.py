"""Distillation losses: each against its formula computed independently, their defining properties,
and bad inputs."""

import pytest
import torch

from compress.distillation import forward_kl, hidden_mse, reverse_kl, topk_kl
from compress.errors import ConfigError


def _logits(seed, shape=(2, 5, 11)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 3


def _kl(p_logits, q_logits):                     # KL(p || q) per token, float64, by definition
    p = torch.softmax(p_logits.double(), -1)
    q = torch.softmax(q_logits.double(), -1)
    return (p * (p / q).log()).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_forward_and_reverse_kl_are_the_textbook_formulas(temperature):
    s, t = _logits(0), _logits(1)
    T = temperature
    assert forward_kl(s, t, temperature=T).item() == pytest.approx(T ** 2 * _kl(t / T, s / T).mean().item(), rel=1e-5)
    assert reverse_kl(s, t, temperature=T).item() == pytest.approx(T ** 2 * _kl(s / T, t / T).mean().item(), rel=1e-5)
    assert forward_kl(s, t).item() != pytest.approx(reverse_kl(s, t).item(), rel=1e-3)    # not symmetric


def test_losses_are_zero_only_when_student_matches_teacher():
    t = _logits(1)
    assert forward_kl(t.clone(), t).item() == pytest.approx(0, abs=1e-6)
    assert reverse_kl(t.clone(), t).item() == pytest.approx(0, abs=1e-6)
    assert hidden_mse(t.clone(), t).item() == 0
    s = _logits(0)
    assert forward_kl(s, t) > 0 and reverse_kl(s, t) > 0 and hidden_mse(s, t) > 0


def test_mask_averages_over_real_tokens_only():
    s, t = _logits(0), _logits(1)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    expected = _kl(t, s)[0, :2].mean().item()
    assert forward_kl(s, t, mask=mask).item() == pytest.approx(expected, rel=1e-5)


def test_topk_kl_with_the_full_vocabulary_is_forward_kl():
    s, t = _logits(0), _logits(1)
    values, indices = t.topk(11, dim=-1)
    assert topk_kl(s, values, indices, temperature=2.0).item() == pytest.approx(
        forward_kl(s, t, temperature=2.0).item(), rel=1e-5)


def test_topk_kl_approaches_forward_kl_and_moves_the_student_the_same_way():
    s, t = _logits(0, (4, 8, 200)), _logits(1, (4, 8, 200))
    t = t * 2                                                       # a peaked teacher, as trained LMs are
    values, indices = t.topk(20, dim=-1)
    lse = torch.logsumexp(t, dim=-1)
    approx = topk_kl(s, values, indices, teacher_logsumexp=lse).item()
    exact = forward_kl(s, t).item()
    assert approx == pytest.approx(exact, rel=0.1)
    s1 = s.clone().requires_grad_(True)
    topk_kl(s1, values, indices, teacher_logsumexp=lse).backward()
    s2 = s.clone().requires_grad_(True)
    forward_kl(s2, t).backward()
    cos = torch.nn.functional.cosine_similarity(s1.grad.flatten(), s2.grad.flatten(), dim=0)
    assert cos > 0.9


def test_hidden_mse_is_scale_free():
    s, t = _logits(0, (2, 5, 16)), _logits(1, (2, 5, 16))
    assert hidden_mse(10 * s, 10 * t).item() == pytest.approx(hidden_mse(s, t).item(), rel=1e-5)


def test_bad_inputs_name_the_problem():
    with pytest.raises(ConfigError, match="shapes differ"):
        forward_kl(_logits(0), _logits(1, (2, 5, 12)))
    with pytest.raises(ConfigError, match="temperature must be positive"):
        reverse_kl(_logits(0), _logits(1), temperature=0)
    with pytest.raises(ConfigError, match="top-k teacher"):
        topk_kl(_logits(0), torch.zeros(2, 5, 3), torch.zeros(2, 5, 4, dtype=torch.long))
