"""Run a model once per mode under a ``TorchFunctionMode`` and record how channels flow.

The tracer sees every torch function call of the forward (``F.conv2d``, ``Tensor.view``, ``torch.cat``,
``+`` ...), gives the outputs label tensors (see :mod:`labels`) by the rules in :mod:`rules`, and
collects three things: *spaces* (the output channels of every producer, keyed by the producing
parameter so a layer called twice has one space), *slots* (every dimension of every parameter or
buffer whose indices follow a space) and *edges* (pairs of elements that must be removed together).
Modules with a rule of their own (:mod:`module_rules`) are traced as a whole, once their rules have prepared
them (a tensor that changes nothing they compute). Nothing else of the model changes: modes, buffers and the
RNG state are restored afterwards.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from lightning_prune.errors import TraceError
from lightning_prune.graph.builder import Trace, TraceBuilder
from lightning_prune.graph.module_rules import module_rule, prepare_modules
from lightning_prune.graph.rules import apply_rule
from lightning_prune.measure import MacCounter
from lightning_prune.running import ExampleInputs, preserved_state, run_model


class _Mode(TorchFunctionMode):
    def __init__(self, builder: TraceBuilder) -> None:
        super().__init__()
        self.builder = builder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = func(*args, **kwargs)
        except Exception:
            if self.builder.failed_at is None:
                self.builder.failed_at = self.builder.where
            raise
        if self.builder.inside_atomic:
            return out
        with _disable_current_modes():  # label bookkeeping is not part of the model (nor of its MAC count)
            apply_rule(self.builder, func, args, kwargs, out)
        return out


@contextlib.contextmanager
def _module_stack(builder: TraceBuilder) -> Iterator[None]:
    def push(module: nn.Module, inputs: Any) -> None:
        name = builder.module_names.get(id(module), f"<{type(module).__name__} outside the model>")
        builder.module_stack.append(name)
        if builder.atomic is None and module_rule(module) is not None:
            builder.atomic = (module, inputs)

    def pop(module: nn.Module, inputs: Any, output: Any) -> None:
        if builder.failed_at is None and sys.exc_info()[1] is not None:
            builder.failed_at = builder.where  # the innermost module an exception is leaving
        if builder.atomic is not None and builder.atomic[0] is module:
            rule = module_rule(module)
            builder.atomic = None
            with _disable_current_modes():
                rule(builder, module, inputs, output)
        if builder.module_stack:
            builder.module_stack.pop()

    pre = nn.modules.module.register_module_forward_pre_hook(push)
    post = nn.modules.module.register_module_forward_hook(pop, always_call=True)
    try:
        yield
    finally:
        pre.remove()
        post.remove()


def _freeze_outputs(builder: TraceBuilder, output: Any) -> None:
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    stack = list(leaves)
    while stack:
        leaf = stack.pop()
        if isinstance(leaf, Tensor):
            builder.freeze(builder.label(leaf), "model output")
        elif isinstance(leaf, Mapping):
            stack.extend(leaf.values())
        elif isinstance(leaf, tuple | list):
            stack.extend(leaf)
        elif hasattr(leaf, "__dict__") and not isinstance(leaf, nn.Module):
            stack.extend(vars(leaf).values())


def trace_model(
    model: nn.Module,
    example_inputs: ExampleInputs,
    modes: Iterable[str] = ("train", "eval"),
    space_init: Mapping[str | tuple[str, int], Tensor] | None = None,
    num_elements: int = 1,
    fixed_splits: Iterable[str] = (),
) -> Trace:
    """Run ``model`` on ``example_inputs`` once per mode and return what flowed where.

    The eval-mode pass also counts the model's MACs (``Trace.macs``, as ``measure.count_macs`` would).

    ``space_init`` gives fixed element ids to spaces (``(tensor, dim)``) and raw tensors (``name``);
    verification uses it to label a pruned model with the ids of the original elements it kept.
    ``fixed_splits`` are split sites (``Trace.split_sites``) whose parts keep their sizes.
    """
    prepare_modules(model)
    builder = TraceBuilder(model, space_init, num_elements, fixed_splits)
    macs = None
    for mode in modes:
        if mode not in ("train", "eval"):
            raise TraceError(f"`modes` entries must be 'train' or 'eval', got {mode!r}.")
        counter = MacCounter() if mode == "eval" else contextlib.nullcontext()
        with preserved_state(model), torch.no_grad(), _module_stack(builder):
            model.train(mode == "train")
            try:
                with counter, _Mode(builder):
                    output = run_model(model, example_inputs)
            except TraceError:
                raise
            except Exception as error:  # the user's forward failed: say where and with what
                where = builder.failed_at or builder.where
                builder.module_stack.clear()
                hint = ""
                if "more than 1 value per channel" in str(error):
                    hint = " Hint: BatchNorm in training mode needs a batch of at least 2 examples."
                raise TraceError(
                    f"running the model on `example_inputs` in {mode} mode failed in module `{where}`: "
                    f"{type(error).__name__}: {error}. Pass inputs the model accepts: a tensor, a tuple of "
                    f"positional inputs or a dict of keyword inputs.{hint}",
                    module=where,
                ) from error
        _freeze_outputs(builder, output)
        if isinstance(counter, MacCounter):
            counter.warn_uncounted()
            macs = counter.macs
    trace = builder.trace()
    trace.macs = macs
    return trace
