"""Recovery after a cut: LoRA adapters merged back (LLM-Pruner's recipe) or full fine-tuning, on a token budget.

:func:`lora_recover` puts low-rank adapters (through the ``peft`` library) on the linear layers of the pruned
blocks, trains only them on calibration or training windows, and merges them into the weights: what is
left is a plain, smaller dense model of the same class, whose ``state_dict`` keys are those it had, that
saves and reloads like any other. :func:`finetune` trains every parameter instead. Both are plain PyTorch
loops for one-shot use; inside a Lightning run, recovery is ordinary training of the pruned module.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from lightning_prune.depth import find_blocks
from lightning_prune.errors import PruningError
from lightning_prune.running import preserved_state


@dataclass
class RecoveryResult:
    """How a recovery went: optimizer steps, tokens seen, and the training loss of the first and last batches."""

    steps: int
    tokens: int
    first_loss: float
    last_loss: float


def block_linears(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Distinct leaf names of the linear layers inside the model's block stack (``q_proj``, ``down_proj`` ...)."""
    stack = model.get_submodule(blocks or find_blocks(model))
    names = sorted({name.rsplit(".", 1)[-1] for name, module in stack.named_modules() if isinstance(module, nn.Linear)})
    if not names:
        raise PruningError(f"the block stack of {type(model).__name__} holds no nn.Linear for LoRA adapters.")
    return names


def _checked(batches: Iterable[Tensor], lr: float, epochs: int) -> list[Tensor]:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise PruningError(f"`epochs` must be a positive integer, got {epochs!r}.")
    if isinstance(lr, bool) or not isinstance(lr, int | float) or lr <= 0:
        raise PruningError(f"`lr` must be a positive number, got {lr!r}.")
    batches = list(batches)
    if not batches:
        raise PruningError("`batches` is empty: recovery needs at least one batch of token windows.")
    return batches


def _train(
    model: nn.Module,
    parameters: Sequence[nn.Parameter],
    batches: list[Tensor],
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    lr: float,
    epochs: int,
) -> RecoveryResult:
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    total = epochs * len(batches)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total)))
    losses, tokens = [], 0
    with preserved_state(model):
        model.train()
        for _ in range(epochs):
            for batch in batches:
                loss = loss_fn(model, batch)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                losses.append(float(loss.detach()))
                tokens += batch.numel()
    return RecoveryResult(total, tokens, losses[0], losses[-1])


def lora_recover(
    model: nn.Module,
    batches: Iterable[Tensor],
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    *,
    rank: int = 8,
    alpha: int = 16,
    dropout: float = 0.05,
    lr: float = 1e-4,
    epochs: int = 2,
    targets: Sequence[str] | None = None,
) -> RecoveryResult:
    """Train LoRA adapters on ``targets`` (default: every linear layer of the block stack) and merge them, in place.

    LLM-Pruner's values: ``rank=8``, ``alpha=16``, ``dropout=0.05``, ``lr=1e-4``, 2 epochs.

    Raises:
        PruningError: bad arguments, before anything changes.
    """
    from peft import LoraConfig, get_peft_model

    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise PruningError(f"`rank` must be a positive integer, got {rank!r}.")
    batches = _checked(batches, lr, epochs)
    names = list(targets) if targets is not None else block_linears(model)
    trainable = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=names, bias="none")
    wrapped = get_peft_model(model, config)
    adapters = [p for p in wrapped.parameters() if p.requires_grad]
    try:
        result = _train(wrapped, adapters, batches, loss_fn, lr, epochs)
    finally:
        wrapped.merge_and_unload()  # the adapters' product joins the weights; the layers are plain again
        for parameter, flag in trainable:
            parameter.requires_grad_(flag)
    return result


def finetune(
    model: nn.Module,
    batches: Iterable[Tensor],
    loss_fn: Callable[[nn.Module, Tensor], Tensor],
    *,
    lr: float = 1e-4,
    epochs: int = 1,
) -> RecoveryResult:
    """Train every parameter of ``model`` on ``batches`` (AdamW, cosine decay), in place."""
    return _train(model, list(model.parameters()), _checked(batches, lr, epochs), loss_fn, lr, epochs)
