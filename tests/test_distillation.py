"""Distillation losses against direct float64 computations, and MiniLLM's estimator against the exact gradient of the
sequence-level reverse KL on a vocabulary small enough to enumerate every continuation."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from lightning_prune.errors import PruningError
from lightning_prune.methods.distillation import forward_kl, logits_of, reverse_kl
from lightning_prune.methods.minillm import MiniLLMOptions, agreement, minillm_loss, sample_mixed


def direct_kl(first: torch.Tensor, second: torch.Tensor, temperature: float, mask: torch.Tensor) -> float:
    """Mean over the masked positions of KL(softmax(first/T) ‖ softmax(second/T)) · T², in float64, by loops."""
    total, count = 0.0, 0
    for index in itertools.product(*(range(n) for n in mask.shape)):
        if not mask[index]:
            continue
        p = torch.softmax(first[index].double() / temperature, -1)
        q = torch.softmax(second[index].double() / temperature, -1)
        total += float(sum(p[v] * (p[v].log() - q[v].log()) for v in range(p.numel())))
        count += 1
    return total / count * temperature**2


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_forward_and_reverse_kl_match_a_direct_float64_computation_with_padding_masked(temperature: float) -> None:
    torch.manual_seed(0)
    student, teacher = torch.randn(2, 4, 7) * 3, torch.randn(2, 4, 7) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    expected_forward = direct_kl(teacher, student, temperature, mask)
    expected_reverse = direct_kl(student, teacher, temperature, mask)
    assert float(forward_kl(student, teacher, temperature, mask)) == pytest.approx(expected_forward, rel=1e-5)
    assert float(reverse_kl(student, teacher, temperature, mask)) == pytest.approx(expected_reverse, rel=1e-5)
    assert expected_forward != pytest.approx(expected_reverse, rel=1e-2)  # the two directions differ here
    garbage = student.clone()
    garbage[0, 3] = 1e4  # a padded position changes nothing
    assert float(forward_kl(garbage, teacher, temperature, mask)) == pytest.approx(expected_forward, rel=1e-5)


@pytest.mark.parametrize("loss", [forward_kl, reverse_kl])
def test_kl_of_a_distribution_with_itself_is_zero_and_only_the_student_gets_gradients(loss) -> None:
    torch.manual_seed(1)
    logits = torch.randn(3, 5, 11)
    assert float(loss(logits, logits.clone(), 2.0)) == pytest.approx(0.0, abs=1e-6)
    student, teacher = logits.clone().requires_grad_(), torch.randn(3, 5, 11).requires_grad_()
    loss(student, teacher).backward()
    assert teacher.grad is None and student.grad.abs().sum() > 0


def test_half_precision_logits_give_a_float32_loss_close_to_the_float32_one() -> None:
    torch.manual_seed(2)
    student, teacher = torch.randn(4, 9), torch.randn(4, 9)
    low = forward_kl(student.bfloat16(), teacher.bfloat16(), 2.0)
    assert low.dtype == torch.float32
    assert float(low) == pytest.approx(float(forward_kl(student, teacher, 2.0)), rel=2e-2)


def test_bad_logits_masks_and_temperatures_are_refused() -> None:
    with pytest.raises(PruningError, match=r"shape \(2, 5\) but the teacher's \(2, 6\).*same classes or vocabulary"):
        forward_kl(torch.zeros(2, 5), torch.zeros(2, 6))
    with pytest.raises(PruningError, match="`temperature` must be a number > 0, got 0"):
        reverse_kl(torch.zeros(2, 5), torch.zeros(2, 5), temperature=0)
    with pytest.raises(PruningError, match=r"`mask` has shape \(3,\)"):
        reverse_kl(torch.zeros(2, 5), torch.zeros(2, 5), mask=torch.ones(3))
    with pytest.raises(PruningError, match="holds no logits"):
        logits_of("text")
    with pytest.raises(PruningError, match=r"`mix`.*in \[0, 1\], got 1.5"):
        MiniLLMOptions(mix=1.5)


class TableLM(nn.Module):
    """A causal LM whose logits at position i depend on (i, token i) only: every probability is a table entry."""

    def __init__(self, length: int, vocabulary: int, scale: float, seed: int) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(length, vocabulary, vocabulary, generator=generator) * scale)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1])
        return self.table[positions[None], input_ids]


def exact_and_expected_gradients(
    new_tokens: int, mix: float, normalize_length: bool, vocabulary: int = 3
) -> tuple[torch.Tensor, torch.Tensor]:
    """∇ KL(q ‖ p) over every continuation of one prompt token, and the expectation of the estimator's gradient under
    the distribution it samples from (every continuation, weighted by its sampling probability)."""
    student, teacher = TableLM(new_tokens + 1, vocabulary, 1.0, 0), TableLM(new_tokens + 1, vocabulary, 1.5, 1)
    teacher.requires_grad_(False)
    prompt = torch.tensor([[1]])
    continuations = torch.tensor(list(itertools.product(range(vocabulary), repeat=new_tokens)))
    ids = torch.cat([prompt.expand(len(continuations), 1), continuations], dim=1)
    log_q = torch.log_softmax(student(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0].sum(-1)
    log_p = torch.log_softmax(teacher(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0].sum(-1)
    kl = (log_q.exp() * (log_q - log_p)).sum()  # sequence level, exactly
    exact = torch.autograd.grad(kl, student.table)[0]
    with torch.no_grad():
        q = torch.softmax(student(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0]
        p = torch.softmax(teacher(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0]
        sampled = (mix * p + (1 - mix) * q).prod(-1)  # the probability of drawing each continuation
    surrogate = sum(
        sampled[i] * minillm_loss(student(ids[i : i + 1])[:, :-1], teacher(ids[i : i + 1])[:, :-1],
                                  continuations[i : i + 1], mix, normalize_length=normalize_length)
        for i in range(len(continuations))
    )  # fmt: skip
    expected = torch.autograd.grad(surrogate, student.table)[0] * new_tokens  # the loss averages over tokens
    return exact, expected


@pytest.mark.parametrize("new_tokens", [1, 2, 3])
def test_minillm_estimator_is_unbiased_without_mixing_or_length_normalisation(new_tokens: int) -> None:
    exact, expected = exact_and_expected_gradients(new_tokens, mix=0.0, normalize_length=False)
    assert exact.abs().sum() > 0
    assert torch.allclose(expected, exact, atol=1e-5)


def test_minillm_estimator_with_the_papers_mixing_and_normalisation_points_downhill() -> None:
    exact, expected = exact_and_expected_gradients(3, mix=0.2, normalize_length=True)
    cosine = torch.nn.functional.cosine_similarity(exact.flatten(), expected.flatten(), dim=0)
    assert cosine > 0.9  # biased (per-token weights, normalised rewards) but a descent direction of the true KL
    step = TableLM(4, 3, 1.0, 0)  # the student above; a small step along the estimate lowers the true KL
    with torch.no_grad():
        step.table -= 0.05 * expected
    teacher = TableLM(4, 3, 1.5, 1)
    assert sequence_kl(step, teacher, 3) < sequence_kl(TableLM(4, 3, 1.0, 0), teacher, 3)


def sequence_kl(student: nn.Module, teacher: nn.Module, new_tokens: int, vocabulary: int = 3) -> float:
    continuations = torch.tensor(list(itertools.product(range(vocabulary), repeat=new_tokens)))
    ids = torch.cat([torch.ones(len(continuations), 1, dtype=torch.long), continuations], dim=1)
    with torch.no_grad():
        log_q = torch.log_softmax(student(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0].sum(-1)
        log_p = torch.log_softmax(teacher(ids)[:, :-1], -1).gather(-1, continuations[..., None])[..., 0].sum(-1)
    return float((log_q.exp() * (log_q - log_p)).sum())


def test_mixed_sampling_draws_from_the_teacher_at_mix_one_and_the_student_at_zero() -> None:
    student, teacher = TableLM(6, 5, 50.0, 0), TableLM(6, 5, 50.0, 1)  # near-deterministic tables
    prompt = torch.tensor([[2], [4]])
    generator = torch.Generator().manual_seed(0)

    def greedy(model: nn.Module) -> torch.Tensor:
        ids = prompt
        for _ in range(4):
            ids = torch.cat([ids, model(ids)[:, -1:].argmax(-1)], dim=1)
        return ids

    assert torch.equal(sample_mixed(student, teacher, prompt, 4, 1.0, generator), greedy(teacher))
    assert torch.equal(sample_mixed(student, teacher, prompt, 4, 0.0, generator), greedy(student))
    assert not torch.equal(greedy(student), greedy(teacher))
    assert agreement(teacher, teacher, prompt, 4) == 1.0
    assert agreement(student, teacher, prompt, 4) < 1.0
