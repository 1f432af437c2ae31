"""MiniLLM (Gu et al. 2024): sequence-level reverse-KL distillation of a causal LM by policy gradient.

The objective is ``KL(q_θ ‖ p)`` over whole continuations ``y`` of a prompt ``x``, ``q_θ`` the student and ``p``
the teacher. With ``r_t = log p(y_t | y_<t, x) − log q(y_t | y_<t, x)`` its gradient is
``−E_{y∼q}[Σ_t (Σ_{t'≥t} r_t') ∇ log q(y_t | …)]``. The paper's estimator, implemented here:

- the ``t' = t`` part is taken in expectation over the vocabulary, exactly: the single-step term
  ``Σ_t KL(q(·|y_<t) ‖ p(·|y_<t))`` (:func:`~lightning_prune.methods.distillation.reverse_kl` at each position);
- the rest, ``Σ_{t'>t} r_t'``, is a REINFORCE reward on ``log q(y_t)``; with ``normalize_length`` it is divided by
  the number of future tokens (length normalisation, so long continuations do not dominate);
- continuations are sampled from the teacher-mixed ``p̃ = mix·p + (1 − mix)·q`` (``mix`` = 0.2 in the paper's code)
  and every token's terms are weighted by ``w_t = q(y_t) / p̃(y_t)`` (the paper's per-token importance weight).

With ``mix = 0`` and no length normalisation the estimate is unbiased (tested against the exact gradient on a
tiny vocabulary); the paper's modifications trade a little bias for much less variance. The LM loss on
pre-training text, the paper's ``L_PT``, is the task loss the distillation callback mixes in. The paper's PPO
clipping and reward baseline are left out: each sample is used once, on-policy.

Sampling recomputes every prefix (no KV cache): simple, exact, and cheap at the lengths used for recovery.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.methods.distillation import logits_of, masked_mean
from lightning_prune.running import preserved_state

LanguageModel = Callable[[Tensor], Tensor]  # input_ids (B, L) -> logits (B, L, V)


@dataclass
class MiniLLMOptions:
    """How MiniLLM samples: the first ``prompt_tokens`` of each training window are the prompt, ``new_tokens`` are
    sampled after it from the teacher-mixed distribution (``mix`` of the teacher), with length normalisation."""

    prompt_tokens: int = 16
    new_tokens: int = 16
    mix: float = 0.2
    normalize_length: bool = True

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "new_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise PruningError(f"`{name}` must be a positive integer, got {value!r}.")
        if isinstance(self.mix, bool) or not isinstance(self.mix, int | float) or not 0 <= self.mix <= 1:
            raise PruningError(f"`mix` (the teacher's share when sampling) must be in [0, 1], got {self.mix!r}.")

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def language_model(model: nn.Module) -> LanguageModel:
    """``input_ids -> logits`` for a Hugging Face causal LM (or any module returning logits)."""
    return lambda ids: logits_of(model(input_ids=ids, use_cache=False), type(model).__name__)


@torch.no_grad()
def sample_mixed(
    student: LanguageModel,
    teacher: LanguageModel,
    prompt: Tensor,
    new_tokens: int,
    mix: float,
    generator: torch.Generator | None = None,
) -> Tensor:
    """``prompt`` (B, P) followed by ``new_tokens`` tokens sampled from ``mix·p + (1 − mix)·q``, token by token."""
    ids = prompt
    for _ in range(new_tokens):
        q = F.softmax(student(ids)[:, -1].float(), dim=-1)
        p = F.softmax(teacher(ids)[:, -1].float(), dim=-1) if mix > 0 else q
        mixed = mix * p + (1 - mix) * q
        ids = torch.cat([ids, torch.multinomial(mixed, 1, generator=generator)], dim=1)
    return ids


def minillm_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    tokens: Tensor,
    mix: float = 0.2,
    mask: Tensor | None = None,
    normalize_length: bool = True,
) -> Tensor:
    """The surrogate whose gradient is MiniLLM's estimate of ``∇ KL(q ‖ p)``, averaged over generated tokens.

    Args:
        student_logits, teacher_logits: (B, T, V), position ``t`` predicting ``tokens[:, t]`` (the student's with
            gradients; the teacher's are detached).
        tokens: (B, T) the sampled continuation.
        mix: the teacher's share of the distribution the tokens were sampled from.
        mask: (B, T), false after the end of a continuation.
        normalize_length: divide each token's future reward by the number of future tokens.
    """
    log_q = F.log_softmax(student_logits.float(), dim=-1)
    log_p = F.log_softmax(teacher_logits.detach().float(), dim=-1)
    chosen_q = log_q.gather(-1, tokens[..., None])[..., 0]
    chosen_p = log_p.gather(-1, tokens[..., None])[..., 0]
    valid = torch.ones_like(chosen_q) if mask is None else mask.to(chosen_q.dtype)
    with torch.no_grad():
        reward = (chosen_p - chosen_q) * valid  # r_t = log p/q of the token taken
        # Σ_{t'>t} r_t' and the number of those tokens: reversed cumulative sums, shifted by one
        future = reward.flip(-1).cumsum(-1).flip(-1) - reward
        count = valid.flip(-1).cumsum(-1).flip(-1) - valid
        if normalize_length:
            future = future / count.clamp_min(1.0)
        weight = chosen_q.exp() / (mix * chosen_p.exp() + (1 - mix) * chosen_q.exp())
    single_step = (log_q.exp() * (log_q - log_p)).sum(-1)  # KL(q_t ‖ p_t), exact over the vocabulary
    per_token = weight * (single_step - future * chosen_q)
    return masked_mean(per_token, valid)


def minillm_step(
    student: nn.Module,
    teacher: nn.Module,
    windows: Tensor,
    options: MiniLLMOptions,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Sample continuations of the windows' first ``prompt_tokens`` (both models in eval mode, no gradients), then
    run the student with gradients on them: the MiniLLM loss, and the sampled ids (B, P + T)."""
    if windows.ndim != 2 or windows.shape[1] < options.prompt_tokens:
        raise PruningError(
            f"MiniLLM prompts are the first `prompt_tokens`={options.prompt_tokens} tokens of each window, but the "
            f"windows have shape {tuple(windows.shape)}: lower `prompt_tokens`."
        )
    prompt = windows[:, : options.prompt_tokens]
    with preserved_state(student):
        student.eval()
        ids = sample_mixed(language_model(student), language_model(teacher), prompt, options.new_tokens, options.mix,
                           generator)  # fmt: skip
    start = options.prompt_tokens - 1  # the logits at position i predict token i + 1
    student_logits = language_model(student)(ids)[:, start:-1]
    with torch.no_grad():
        teacher_logits = language_model(teacher)(ids)[:, start:-1]
    loss = minillm_loss(
        student_logits, teacher_logits, ids[:, options.prompt_tokens :], options.mix,
        normalize_length=options.normalize_length,
    )  # fmt: skip
    return loss, ids


@torch.no_grad()
def agreement(student: nn.Module, teacher: nn.Module, prompts: Tensor, new_tokens: int) -> float:
    """Teacher-student agreement on the student's own greedy continuations of ``prompts``: the share of generated
    tokens that the teacher, given the same prefix, would also have chosen greedily."""
    with preserved_state(student), preserved_state(teacher):
        student.eval()
        teacher.eval()
        ids = prompts
        for _ in range(new_tokens):
            ids = torch.cat([ids, language_model(student)(ids)[:, -1:].argmax(-1)], dim=1)
        choices = language_model(teacher)(ids)[:, prompts.shape[1] - 1 : -1].argmax(-1)
    return float((choices == ids[:, prompts.shape[1] :]).float().mean())
