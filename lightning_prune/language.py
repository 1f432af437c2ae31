"""Measuring causal language models: perplexity on held-out windows, and generation speed.

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


def check_windows(model: nn.Module, windows: Tensor, argument: str = "windows") -> None:
    """Refuse token windows that ``model`` cannot read, before it runs on them.

    ``windows`` is a ``(count, tokens)`` tensor of token ids. Checked: the shape; the length against the
    positions the model was built for (``config.max_position_embeddings``, where the model has one); the ids
    against its input embeddings (``get_input_embeddings()``, where it has one).

    Raises:
        ValueError: naming ``argument``, the value found and the limit.
    """
    if not isinstance(windows, Tensor) or windows.ndim != 2 or windows.shape[1] < 2:
        shape = tuple(windows.shape) if isinstance(windows, Tensor) else type(windows).__name__
        raise ValueError(f"`{argument}` must be (count, tokens ≥ 2) token ids, got {shape}.")
    length = windows.shape[1]
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(positions, int) and length > positions:
        raise ValueError(
            f"`{argument}`: windows of {length} tokens are longer than the model's {positions} positions "
            f"(config.max_position_embeddings); use windows of at most {positions} tokens."
        )
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if windows.numel() and isinstance(rows, int):
        low, high = int(windows.min()), int(windows.max())
        if low < 0 or high >= rows:
            raise ValueError(
                f"`{argument}` holds token id {high if high >= rows else low}, outside the model's {rows} embeddings "
                f"(ids 0..{rows - 1}): the text was tokenized for another model. Use the tokenizer saved with it."
            )


def perplexity(model: nn.Module, windows: Tensor | Iterable[Tensor], batch_size: int = 8) -> float:
    """Perplexity of ``model`` on ``windows`` (a ``(count, tokens)`` tensor of token ids, or batches of them).

    The model is run in eval mode without gradients and left as it was.

    Raises:
        ValueError: windows the model cannot read (see :func:`check_windows`), or none at all.
    """
    if isinstance(windows, Tensor):
        check_windows(model, windows)
        windows = windows.split(batch_size)
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with preserved_state(model), torch.no_grad():
        model.eval()
        for batch in windows:
            check_windows(model, batch)
            nll, tokens = token_nll(model, batch.to(device))
            total, count = total + nll, count + tokens
    if count == 0:
        raise ValueError("`windows` is empty: perplexity needs at least one window of two tokens.")
    return math.exp(total / count)


def generation_speed(
    model: nn.Module, prompt: Tensor, new_tokens: int = 64, repeats: int = 5, *, threads: int | None = None
) -> dict[str, float]:
    """Greedy generation throughput with the key/value cache: generated tokens per second over ``repeats`` runs.

    ``prompt`` is ``(batch, tokens)`` token ids; every run generates exactly ``new_tokens`` per row. Returns the
    median and the interquartile range of the runs (``tokens_per_second``, ``low``, ``high``) and the thread
    count, so that two models are compared by overlapping ranges, not by one noisy number. A warm-up run
    comes first.
    """
    if isinstance(new_tokens, bool) or not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"`new_tokens` must be a positive integer, got {new_tokens!r}.")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"`repeats` must be a positive integer, got {repeats!r}.")
    import time

    previous = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    rates = []
    options = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False, "use_cache": True}
    try:
        with preserved_state(model), torch.inference_mode():
            model.eval()
            for run in range(repeats + 1):
                start = time.perf_counter()
                model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), **options)
                if run:  # the first run warms up
                    rates.append(prompt.shape[0] * new_tokens / (time.perf_counter() - start))
    finally:
        torch.set_num_threads(previous)
    values = torch.tensor(rates, dtype=torch.float64)
    low, median, high = (float(values.quantile(q)) for q in (0.25, 0.5, 0.75))
    return {"tokens_per_second": median, "low": low, "high": high, "threads": float(threads or previous)}
