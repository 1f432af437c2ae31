"""Measuring causal language models: perplexity on held-out windows.

Perplexity is ``exp`` of the mean negative log-likelihood over every predicted token (a window of ``L``
tokens predicts ``L - 1``), accumulated in float64 in eval mode: deterministic, and token-weighted however
the windows are batched.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_prune.running import preserved_state


def _logits(output: object) -> Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, Tensor) or logits.ndim != 3:
        raise TypeError(
            f"the model returned {type(output).__name__}, not logits of shape (batch, tokens, vocabulary) or an "
            "output with `.logits`: perplexity needs a causal language model."
        )
    return logits


def token_nll(model: nn.Module, input_ids: Tensor) -> tuple[float, int]:
    """Summed negative log-likelihood of the next-token predictions of a ``(batch, tokens)`` window batch, and
    how many tokens it covers."""
    logits = _logits(model(input_ids=input_ids, use_cache=False) if _takes_keywords(model) else model(input_ids))
    targets = input_ids[:, 1:]
    losses = F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="sum"
    )
    return float(losses), targets.numel()


def _takes_keywords(model: nn.Module) -> bool:
    return hasattr(model, "config") and hasattr(model, "generate")  # a Hugging Face model


def perplexity(model: nn.Module, windows: Tensor | Iterable[Tensor], batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``windows`` (a ``(count, tokens)`` tensor of token ids, or batches of them).

    The model is run in eval mode without gradients and left as it was.
    """
    if isinstance(windows, Tensor):
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"`windows` must be (count, tokens ≥ 2) token ids, got shape {tuple(windows.shape)}.")
        windows = windows.split(batch_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with preserved_state(model), torch.no_grad():
        model.eval()
        for batch in windows:
            nll, tokens = token_nll(model, batch.to(device))
            total, count = total + nll, count + tokens
    if count == 0:
        raise ValueError("`windows` is empty: perplexity needs at least one window of two tokens.")
    return math.exp(total / count)
