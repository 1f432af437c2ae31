"""Run a model once per mode under a ``TorchFunctionMode`` and record how channels flow.

The tracer sees every torch function call of the forward (``F.conv2d``, ``Tensor.view``, ``torch.cat``,
``+`` ...), gives the outputs label tensors (see :mod:`labels`) by the rules in :mod:`rules`, and
collects three things: *spaces* (the output channels of every producer, keyed by the producing
parameter so a layer called twice has one space), *slots* (every dimension of every parameter or
buffer whose indices follow a space) and *edges* (pairs of elements that must be removed together).
Modules with a rule of their own (:mod:`module_rules`) are traced as a whole, once their rules have prepared
them (a tensor that changes nothing they compute). Nothing else of the model changes: modes, buffers and the
RNG state are restored afterwards.

Labels depend on shapes, never on values, so a model on the CPU is traced on a meta-device copy (no kernels
run: ResNet-50's trace takes a fraction of its forward). Where a forward needs values (data-dependent control
flow, ``.item()``, an index tensor whose values a rule replays, an op without a meta kernel) or reads its
device, the copy's trace cannot stand in for the model's: it is dropped and the model itself is traced.
"""

from __future__ import annotations

import contextlib
import sys
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import _disable_current_modes

from lightning_prune.errors import TraceError
from lightning_prune.graph.builder import Trace, TraceBuilder
from lightning_prune.graph.module_rules import module_rule, prepare_modules
from lightning_prune.graph.rules import apply_rule
from lightning_prune.measure import MacCounter
from lightning_prune.running import ExampleInputs, meta_clone, preserved_state, run_model, source_mentions, to_device


class _Mode(TorchFunctionMode):
    def __init__(self, builder: TraceBuilder) -> None:
        super().__init__()
        self.builder = builder

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        try:
            out = (_META_SHORTCUTS.get(func, func) if self.builder.on_meta else func)(*args, **kwargs)
        except Exception:
            if self.builder.failed_at is None:
                self.builder.failed_at = self.builder.where
            raise
        if self.builder.inside_atomic:
            return out
        with _disable_current_modes():  # label bookkeeping is not part of the model (nor of its MAC count)
            apply_rule(self.builder, func, args, kwargs, out)
        return out


# On meta tensors torch runs these through Python decompositions (ReLU 0.36 ms, Hardswish 2.5 ms, batch_norm 1.8 ms
# per call, more than on real tensors): a copy's trace computes their outputs' shapes directly, with their checks.
def _meta_like_input(input: Tensor, *args: Any, inplace: bool = False, **kwargs: Any) -> Tensor:
    """An activation's output: the input itself where it works in place (``inplace``, each activation's last
    positional argument), else a new tensor like it."""
    in_place = inplace or (bool(args) and args[-1] is True)
    return input if in_place else torch.empty_like(input)


def _meta_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    if training:
        F._verify_batch_size(input.size())
    _per_channel(input.shape[1] if input.ndim > 1 else 0, running_mean, running_var, weight, bias)
    return torch.empty_like(input)


def _meta_group_norm(
    input: Tensor, num_groups: int, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5
) -> Tensor:
    channels = input.shape[1] if input.ndim > 1 else 0
    if num_groups <= 0 or channels % num_groups:
        raise RuntimeError(f"group_norm: {channels} channels do not split into {num_groups} groups")
    _per_channel(channels, weight, bias)
    return torch.empty_like(input)


def _meta_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    shape = tuple(normalized_shape)
    if tuple(input.shape[input.ndim - len(shape) :]) != shape:
        raise RuntimeError(f"layer_norm: an input of shape {tuple(input.shape)} does not end in {shape}")
    for tensor in (weight, bias):
        if tensor is not None and tuple(tensor.shape) != shape:
            raise RuntimeError(f"layer_norm: a weight or bias of shape {tuple(tensor.shape)} for {shape}")
    return torch.empty_like(input)


def _per_channel(channels: int, *tensors: Tensor | None) -> None:
    for tensor in tensors:
        if tensor is not None and tensor.numel() != channels:
            raise RuntimeError(f"a per-channel tensor of {tensor.numel()} entries for an input of {channels} channels")


_META_SHORTCUTS: dict[Any, Any] = {
    **dict.fromkeys(
        (F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.gelu, F.mish, F.elu, F.selu, F.celu, F.leaky_relu, F.hardtanh),
        _meta_like_input,
    ),
    F.batch_norm: _meta_batch_norm,
    F.group_norm: _meta_group_norm,
    F.layer_norm: _meta_layer_norm,
}


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
    on_meta: bool | None = None,
) -> Trace:
    """Run ``model`` on ``example_inputs`` once per mode and return what flowed where.

    The eval-mode pass also counts the model's MACs (``Trace.macs``, as ``measure.count_macs`` would).

    ``space_init`` gives fixed element ids to spaces (``(tensor, dim)``) and raw tensors (``name``);
    verification uses it to label a pruned model with the ids of the original elements it kept.
    ``fixed_splits`` are split sites (``Trace.split_sites``) whose parts keep their sizes.
    ``on_meta``: trace a meta-device copy first (None: where :func:`meta_traceable`), the model itself if that
    copy cannot be traced; False: the model itself only.
    """
    modes = tuple(modes)
    for mode in modes:
        if mode not in ("train", "eval"):
            raise TraceError(f"`modes` entries must be 'train' or 'eval', got {mode!r}.")
    prepare_modules(model)
    if on_meta is None:
        on_meta = meta_traceable(model)
    if on_meta:
        trace = _trace_meta_copy(model, example_inputs, modes, space_init, num_elements, fixed_splits)
        if trace is not None:
            return trace
    return _trace(TraceBuilder(model, space_init, num_elements, fixed_splits), model, example_inputs, modes)


_READS_DEVICE = r"\.device\.type\b|\.is_cuda\b|\.is_cpu\b|\.is_meta\b|\bdata_ptr\b"


def meta_traceable(model: nn.Module) -> bool:
    """Whether a meta-device copy of ``model`` can be traced in its place: every parameter and buffer is on the
    CPU (elsewhere a forward costs little next to the trace's bookkeeping) and no module's forward asks for its
    tensors' device (a path chosen by device would differ on the copy)."""
    tensors = [*model.parameters(), *model.buffers()]
    if not tensors or any(t.device.type != "cpu" for t in tensors):
        return False
    return not any(source_mentions(forward, _READS_DEVICE) for forward in {type(m).forward for m in model.modules()})


def _trace_meta_copy(
    model: nn.Module,
    example_inputs: ExampleInputs,
    modes: tuple[str, ...],
    space_init: Mapping[str | tuple[str, int], Tensor] | None,
    num_elements: int,
    fixed_splits: Iterable[str],
) -> Trace | None:
    """The trace of a meta-device copy of ``model``, or None where the copy cannot stand in for the model.

    Warnings the copy's run raised are raised again only when its trace is kept (the model's own run raises
    them otherwise)."""
    copy = meta_clone(model)
    inputs = to_device(example_inputs, "meta")
    builder = TraceBuilder(copy, space_init, num_elements, fixed_splits, on_meta=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            trace = _trace(builder, copy, inputs, modes)
        except Exception:  # values were needed, or an op has no meta kernel: trace the model itself
            return None
    if not _holds_values(trace):
        return None
    for warning in caught:
        warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return trace


def _holds_values(trace: Trace) -> bool:
    """Whether every label of ``trace`` is an ordinary tensor (none came from a meta tensor's missing values)."""
    labels = [*trace.spaces.values(), *trace.raw.values(), *(s.labels for s in trace.slots.values())]
    labels += [t for pair in trace.edges for t in pair] + [t for t, _ in trace.frozen]
    return not any(t.is_meta for t in labels)


def _trace(builder: TraceBuilder, model: nn.Module, example_inputs: ExampleInputs, modes: tuple[str, ...]) -> Trace:
    """Run ``model`` once per mode with ``builder`` recording."""
    macs = None
    for mode in modes:
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
