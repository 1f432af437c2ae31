"""Running and inspecting a model without changing it: the helpers every layer of the engine shares.

``run_model`` calls a model on example inputs of any form; ``preserved_state`` puts training flags,
buffers and the RNG back afterwards; ``meta_clone`` copies a model's structure without its memory;
``named_tensors`` and ``tensor_owners`` map parameter and buffer names to tensors and their modules.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

ExampleInputs = Tensor | tuple[Any, ...] | list[Any] | Mapping[str, Any]


def run_model(model: nn.Module, example_inputs: ExampleInputs) -> Any:
    """``model(inputs)``, ``model(*inputs)`` or ``model(**inputs)`` for a tensor, a tuple/list or a mapping."""
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    if isinstance(example_inputs, tuple | list):
        return model(*example_inputs)
    return model(example_inputs)


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Restore training flags, buffers and the RNG after running ``model``."""
    modes = [(module, module.training) for module in model.modules()]
    buffers = [(buffer, buffer.detach().clone()) for buffer in model.buffers()]
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    try:
        with torch.random.fork_rng(devices=devices):
            yield
    finally:
        for module, training in modes:
            module.training = training
        with torch.no_grad():
            for buffer, saved in buffers:
                if buffer.shape == saved.shape:
                    buffer.copy_(saved)


def observe(model: nn.Module, batches: Iterable[ExampleInputs], handles: Iterable[Any]) -> None:
    """Run ``model`` in eval mode without gradients on each batch for the hooks ``handles`` to observe, then
    remove them (also when a batch fails); modes, buffers and the RNG are left as they were."""
    try:
        with preserved_state(model), torch.no_grad():
            model.eval()
            for batch in batches:
                run_model(model, batch)
    finally:
        for handle in handles:
            handle.remove()


def meta_clone(model: nn.Module) -> nn.Module:
    """A structural copy of ``model`` whose parameters and buffers live on the meta device (no memory)."""
    memo: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        meta = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(meta, tensor.requires_grad) if isinstance(tensor, nn.Parameter) else meta
    return copy.deepcopy(model, memo)


def map_tensors(inputs: Any, function: Callable[[Tensor], Any]) -> Any:
    """``inputs`` with ``function`` applied to every tensor, possibly nested in dicts, tuples and lists."""
    if isinstance(inputs, Tensor):
        return function(inputs)
    if isinstance(inputs, dict):
        return {k: map_tensors(v, function) for k, v in inputs.items()}
    if isinstance(inputs, tuple | list):
        return type(inputs)(map_tensors(v, function) for v in inputs)
    return inputs


def to_device(inputs: Any, device: str | torch.device) -> Any:
    """``inputs`` (tensors, possibly nested in dicts, tuples and lists) moved to ``device``."""
    return map_tensors(inputs, lambda tensor: tensor.to(device))


def named_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer of ``model`` by its name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def tensor_owners(model: nn.Module) -> dict[str, list[str]]:
    """Module paths owning each parameter and buffer (more than one when tied)."""
    owners: dict[int, list[str]] = {}
    names: dict[int, str] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if tensor is None:
                continue
            names.setdefault(id(tensor), f"{module_name}.{local}" if module_name else local)
            owners.setdefault(id(tensor), [])
            if module_name not in owners[id(tensor)]:
                owners[id(tensor)].append(module_name)
    return {names[key]: value for key, value in owners.items()}


# Layers whose training mode changes values, never which ops run or how channels flow: tracing one mode covers both.
SAME_FLOW_IN_BOTH_MODES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._BatchNorm,
    nn.modules.instancenorm._InstanceNorm,
    nn.modules.dropout._DropoutNd,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)


@functools.cache
def source_mentions(forward: Any, pattern: str) -> bool:
    """Whether a forward's source matches the regular expression ``pattern`` (True where it cannot be read)."""
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return True
    return re.search(pattern, source) is not None


def _reads_training(forward: Any) -> bool:
    return source_mentions(forward, r"\btraining\b")


def tracing_modes(model: nn.Module) -> tuple[str, ...]:
    """The modes a trace of ``model`` must run in: ``("eval",)`` when no module's forward can take another path in
    training (no forward mentions ``training``, BatchNorm and dropout aside), else ``("train", "eval")``.

    Branches that run only in training (auxiliary heads, stochastic depth, a fast path taken only in eval) are
    found by reading each module class's ``forward``; a forward whose source cannot be read counts as one that
    branches. Tracing once where both modes flow alike halves the cost of tracing and verifying.
    """
    for module in model.modules():
        if isinstance(module, SAME_FLOW_IN_BOTH_MODES):
            continue
        if _reads_training(type(module).forward):
            return ("train", "eval")
    return ("eval",)
