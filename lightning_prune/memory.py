"""Memory before you start: what one training step of a causal LM holds per rank, from a meta-device copy.

Parameters, gradients and optimizer states are counted from the parameters' sizes; activations are measured
by running forward and backward on the meta device (no memory, no compute) and summing every tensor autograd
saves for the backward pass (``torch.autograd.graph.saved_tensors_hooks``), so they follow the model's own
code: its attention, its loss, gradient checkpointing. FSDP divides parameters, gradients and optimizer states
by the number of devices and adds the largest unit it gathers whole (one decoder layer, or what is left at the
root); DDP keeps everything whole and adds its gradient buckets (one more copy of the gradients).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lightning_prune.depth import find_blocks
from lightning_prune.record import restore
from lightning_prune.running import meta_clone

STRATEGIES = ("single", "ddp", "fsdp")
PRECISIONS = {"32-true": torch.float32, "bf16-true": torch.bfloat16, "16-true": torch.float16}
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "sgd": 1, "none": 0}  # tensors the optimizer keeps per parameter
GIB = 1024**3
MIB = 1024**2


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per rank of one training step (see :func:`memory_plan`), and the parameter counts."""

    strategy: str
    devices: int
    batch_size: int
    sequence_length: int
    precision: str
    parameters: int
    trainable: int
    parameter_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    buffer_bytes: int  # DDP's gradient buckets, or FSDP's largest gathered unit

    @property
    def total_bytes(self) -> int:
        return (
            self.parameter_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
            + self.activation_bytes
            + (self.buffer_bytes)
        )

    def to_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "total_bytes": self.total_bytes}


def memory_plan(
    model: nn.Module,
    batch_size: int,
    sequence_length: int,
    strategy: str = "single",
    devices: int = 1,
    optimizer: str = "adamw",
    precision: str = "32-true",
    gradient_checkpointing: bool = False,
    lora_rank: int | None = None,
    record: Mapping[str, Any] | None = None,
    device_memory_gib: float | None = None,
) -> MemoryPlan:
    """The memory one training step of ``model`` (a Hugging Face causal LM, or a module holding one as ``.model``)
    needs per rank, computed on a meta-device copy: ``model`` is not run, moved or changed.

    Args:
        batch_size: windows per rank per step (each rank's loader batch).
        sequence_length: tokens per window.
        strategy: ``"single"``, ``"ddp"`` or ``"fsdp"`` (full sharding over ``devices``).
        devices: ranks in the data-parallel group.
        optimizer: ``"adamw"``/``"adam"`` (two states per trainable parameter), ``"sgd"`` (momentum) or ``"none"``.
        precision: ``"32-true"``, ``"bf16-true"`` or ``"16-true"``: parameters, states and activations alike.
        gradient_checkpointing: plan with each decoder layer's activations recomputed in the backward pass.
        lora_rank: plan a LoRA recovery of this rank on every ``nn.Linear`` of the decoder layers: the base
            weights frozen (no gradients, no optimizer states).
        record: a record of cuts (``PruningResult.record``) to plan for the pruned model: it is replayed on the
            meta copy of the dense ``model``.
        device_memory_gib: if given, refuse a plan whose total exceeds it.

    Raises:
        ValueError: an unknown ``strategy``/``optimizer``/``precision``, sizes below 1, ``devices`` other than 1
            for ``"single"``, a model without input embeddings, or a plan larger than ``device_memory_gib``
            (with the number of FSDP devices that would hold it).

    Example::

        plan = memory_plan(model, batch_size=4, sequence_length=2048, strategy="fsdp", devices=8,
                           precision="bf16-true", gradient_checkpointing=True)
        print(format_plans({"dense": plan}))
    """
    _check_choice("strategy", strategy, STRATEGIES)
    _check_choice("optimizer", optimizer, tuple(OPTIMIZER_STATES))
    _check_choice("precision", precision, tuple(PRECISIONS))
    for name, value in (("batch_size", batch_size), ("sequence_length", sequence_length), ("devices", devices)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if strategy == "single" and devices != 1:
        raise ValueError(f"`strategy`='single' runs on one device, got `devices`={devices}: use 'ddp' or 'fsdp'.")
    if lora_rank is not None and (isinstance(lora_rank, bool) or not isinstance(lora_rank, int) or lora_rank < 1):
        raise ValueError(f"`lora_rank` must be a positive integer or None, got {lora_rank!r}.")
    _language_model(model)  # refuse anything else before copying
    whole = meta_clone(model)
    if record is not None:  # recorded against the module given (a LightningModule's names start with `model.`)
        restore(whole, record)
    clone = _language_model(whole)
    dtype = PRECISIONS[precision]
    clone.to(dtype)
    size = torch.empty((), dtype=dtype).element_size()
    parameters = sum(p.numel() for p in clone.parameters())
    blocks = clone.get_submodule(find_blocks(clone))
    trainable = _lora_parameters(blocks, lora_rank) if lora_rank is not None else parameters
    if lora_rank is not None:
        clone.requires_grad_(False)
    plain = _saved_activation_bytes(meta_clone(clone), batch_size, sequence_length, False)
    activations = plain
    if gradient_checkpointing:  # what the checkpoints keep, plus one layer recomputed at a time
        kept = _saved_activation_bytes(clone, batch_size, sequence_length, True)
        activations = kept + (plain - kept) // len(blocks)
    shard = devices if strategy == "fsdp" else 1
    parameter_bytes = -(-parameters * size // shard)
    gradient_bytes = -(-trainable * size // shard)
    optimizer_bytes = OPTIMIZER_STATES[optimizer] * gradient_bytes
    if strategy == "fsdp":  # the largest unit gathered whole: one decoder layer, or the root's own parameters
        block = max(sum(p.numel() for p in layer.parameters()) for layer in blocks)
        buffer_bytes = max(block, parameters - block * len(blocks)) * size
    else:
        buffer_bytes = gradient_bytes if strategy == "ddp" else 0
    plan = MemoryPlan(
        strategy, devices, batch_size, sequence_length, precision, parameters, trainable, parameter_bytes,
        gradient_bytes, optimizer_bytes, activations, buffer_bytes,
    )  # fmt: skip
    if device_memory_gib is not None and plan.total_bytes > device_memory_gib * GIB:
        raise ValueError(_too_large(plan, device_memory_gib, size, optimizer))
    return plan


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(allowed)}; got {value!r}.")


def _language_model(model: nn.Module) -> nn.Module:
    for candidate in (model, getattr(model, "model", None)):
        if isinstance(candidate, nn.Module) and hasattr(candidate, "get_input_embeddings"):
            return candidate
    raise ValueError(
        f"`model` {type(model).__name__} is not a Hugging Face causal LM (no `get_input_embeddings`), nor does it "
        "hold one as `.model` (as lightning_prune.CausalLM does)."
    )


def _lora_parameters(blocks: nn.Module, rank: int) -> int:
    """LoRA adapters of ``rank`` on every linear layer of the decoder layers: ``rank × (in + out)`` each."""
    return sum(rank * (m.in_features + m.out_features) for m in blocks.modules() if isinstance(m, nn.Linear))


def _saved_activation_bytes(model: nn.Module, batch_size: int, sequence_length: int, checkpointing: bool) -> int:
    """Bytes autograd saves in the forward pass of one step (parameters excluded); with checkpointing, what the
    checkpoints keep (their recomputation runs under torch's own saved-tensor hooks, unseen here)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    if checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    elif getattr(model, "is_activation_checkpointing", False):  # a copy of a model that checkpoints: plan as asked
        model.activation_checkpointing_disable()
    # Fake tensors (meta tensors that say so): Hugging Face skips its data-dependent mask checks for them.
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    for module in model.modules():
        for name, parameter in list(module.named_parameters(recurse=False)):
            setattr(module, name, nn.Parameter(mode.from_tensor(parameter), parameter.requires_grad))
        for name, buffer in list(module.named_buffers(recurse=False)):
            module._buffers[name] = mode.from_tensor(buffer)

    def storage(tensor: torch.Tensor) -> int:
        return tensor.untyped_storage()._cdata

    owned = {storage(p) for p in model.parameters()}
    saved: dict[int, torch.Tensor] = {}  # by storage: views of one tensor (transposes, reshapes) count once

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = storage(tensor)
        if key not in owned:
            saved.setdefault(key, tensor)
        return tensor

    model.train()
    with mode, torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        ids = torch.zeros(batch_size, sequence_length, dtype=torch.long, device="meta")
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids, use_cache=False).loss
        if loss.requires_grad:
            loss.backward()
    return sum(t.untyped_storage().nbytes() for t in saved.values())


def _too_large(plan: MemoryPlan, limit_gib: float, size: int, optimizer: str) -> str:
    fixed = plan.activation_bytes + plan.buffer_bytes
    sharded = (plan.parameters + (1 + OPTIMIZER_STATES[optimizer]) * plan.trainable) * size
    room = limit_gib * GIB - fixed
    hint = (
        f"strategy='fsdp' with devices>={-(-sharded // int(room))} would hold it"
        if room > 0
        else "the activations alone do not fit: lower `batch_size` or `sequence_length`, or set "
        "`gradient_checkpointing`"
    )
    return (
        f"the plan needs {_size(plan.total_bytes)} per rank (strategy={plan.strategy!r}, devices="
        f"{plan.devices}), more than `device_memory_gib`={limit_gib}: {hint}."
    )


def _size(count: int) -> str:
    return f"{count / GIB:.2f} GiB" if count >= GIB / 10 else f"{count / MIB:.2f} MiB"


def format_plans(plans: Mapping[str, MemoryPlan]) -> str:
    """A table with one column per plan (e.g. ``{"dense": ..., "pruned": ...}``), in MiB per rank."""
    rows = [
        ("parameters", lambda p: f"{p.parameters:,}"),
        ("trainable", lambda p: f"{p.trainable:,}"),
        ("weights MiB", lambda p: f"{p.parameter_bytes / MIB:,.1f}"),
        ("gradients MiB", lambda p: f"{p.gradient_bytes / MIB:,.1f}"),
        ("optimizer MiB", lambda p: f"{p.optimizer_bytes / MIB:,.1f}"),
        ("activations MiB", lambda p: f"{p.activation_bytes / MIB:,.1f}"),
        ("buffers MiB", lambda p: f"{p.buffer_bytes / MIB:,.1f}"),
        ("total MiB per rank", lambda p: f"{p.total_bytes / MIB:,.1f}"),
    ]
    first = next(iter(plans.values()))
    title = (
        f"memory per rank: strategy={first.strategy}, devices={first.devices}, batch {first.batch_size} x "
        f"{first.sequence_length} tokens, {first.precision}"
    )
    width = max(len(name) for name, _ in rows)
    cell = max(14, *(len(name) for name in plans))
    lines = [title, f"{'':{width}}  " + "  ".join(f"{name:>{cell}}" for name in plans)]
    lines += [f"{name:{width}}  " + "  ".join(f"{show(p):>{cell}}" for p in plans.values()) for name, show in rows]
    return "\n".join(lines)
