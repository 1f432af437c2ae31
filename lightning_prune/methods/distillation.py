"""Token-level distillation losses on logits: the dense model teaches the pruned one.

Both losses compare, at every position (a token of a language model, a sample of a classifier), the
student's distribution ``q = softmax(student / T)`` with the teacher's ``p = softmax(teacher / T)`` over
the last dimension, drop the positions where ``mask`` is false (padding), and average over the rest:

- :func:`forward_kl`: ``KL(p ‖ q)``, times ``T²`` so that gradients keep their size across temperatures
  (Hinton et al. 2015); Minitron's logit-only distillation with ``T = 1``. Mean-seeking: the student spreads
  over everything the teacher allows.
- :func:`reverse_kl`: ``KL(q ‖ p)``, MiniLLM's single-step term (Gu et al. 2024): mode-seeking, the student
  puts no mass where the teacher puts little. The sequence-level objective of MiniLLM proper is
  :mod:`lightning_prune.methods.minillm`.

The teacher's logits are detached: gradients reach the student only. Everything is computed in float32
whatever the logits' dtype (mixed precision).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_prune.errors import PruningError
from lightning_prune.registry import Registry

TokenLoss = Callable[..., Tensor]
TOKEN_LOSSES: Registry[str, TokenLoss] = Registry(
    "distillation loss", "a function (student_logits, teacher_logits, temperature=, mask=) -> scalar"
)


def _checked(student: Tensor, teacher: Tensor, temperature: float, mask: Tensor | None) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
        raise PruningError(f"`temperature` must be a number > 0, got {temperature!r}.")
    if student.shape != teacher.shape:
        raise PruningError(
            f"the student's logits have shape {tuple(student.shape)} but the teacher's {tuple(teacher.shape)}: "
            "the teacher must predict over the same classes or vocabulary, for the same inputs."
        )
    if mask is not None and mask.shape != student.shape[:-1]:
        raise PruningError(
            f"`mask` has shape {tuple(mask.shape)}; it must be the logits' shape without the last dimension, "
            f"{tuple(student.shape[:-1])}."
        )


def masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """The mean of ``values`` over the positions where ``mask`` is true (all of them when ``mask`` is None)."""
    if mask is None:
        return values.mean()
    keep = mask.to(values.dtype)
    return (values * keep).sum() / keep.sum().clamp_min(1.0)


def _log_probabilities(student: Tensor, teacher: Tensor, temperature: float) -> tuple[Tensor, Tensor]:
    return (
        F.log_softmax(student.float() / temperature, dim=-1),
        F.log_softmax(teacher.detach().float() / temperature, dim=-1),
    )


@TOKEN_LOSSES.decorator("forward_kl")
def forward_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """``T² · mean over positions of KL(p_teacher ‖ q_student)`` at temperature ``T`` (Hinton; Minitron with T=1).

    Raises:
        PruningError: logits of different shapes, a ``mask`` of the wrong shape, or ``temperature`` <= 0.
    """
    _checked(student, teacher, temperature, mask)
    log_q, log_p = _log_probabilities(student, teacher, temperature)
    per_position = (log_p.exp() * (log_p - log_q)).sum(-1)
    return masked_mean(per_position, mask) * temperature**2


@TOKEN_LOSSES.decorator("reverse_kl")
def reverse_kl(student: Tensor, teacher: Tensor, temperature: float = 1.0, mask: Tensor | None = None) -> Tensor:
    """``T² · mean over positions of KL(q_student ‖ p_teacher)``: MiniLLM's single-step term (token-level reverse KL).

    Raises:
        PruningError: logits of different shapes, a ``mask`` of the wrong shape, or ``temperature`` <= 0.
    """
    _checked(student, teacher, temperature, mask)
    log_q, log_p = _log_probabilities(student, teacher, temperature)
    per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
    return masked_mean(per_position, mask) * temperature**2


def token_loss(name: str) -> TokenLoss:
    """The token-level loss registered as ``name`` (``forward_kl``, ``reverse_kl`` or one added to ``TOKEN_LOSSES``)."""
    return TOKEN_LOSSES[name]


def logits_of(output: object, where: str = "the model's output") -> Tensor:
    """The logits in a model's output: the tensor itself, ``.logits`` (Hugging Face), a ``"logits"`` key, or the
    first element of a tuple.

    Raises:
        PruningError: naming ``where``, when none of these holds a floating-point tensor.
    """
    if isinstance(output, dict) or hasattr(output, "logits"):
        found = output.get("logits") if isinstance(output, dict) else output.logits
    elif isinstance(output, tuple | list) and output:
        found = output[0]
    else:
        found = output
    if not isinstance(found, Tensor) or not torch.is_floating_point(found):
        raise PruningError(
            f"{where} holds no logits ({type(output).__name__}): distillation needs a tensor of logits, an output "
            "with `.logits`, a dict with 'logits', or a tuple whose first element is the logits."
        )
    return found
