"""Sheared-LLaMA (Xia et al., ICLR 2024): learn hard-concrete masks that reach a target architecture, then cut to it.

The target is a shape of the model's own family (hidden size, key/value head groups, FFN width, number of layers;
any subset), so the result is a stock model of that family. :class:`Shearing` puts gates on the real model through
hooks, found from the engine's dependency graph (the hidden stream's group, each layer's head groups and FFN
neurons), never by naming a family:

- the stream's writers (embeddings, attention and MLP output projections) scale their outputs by the hidden gates;
  every norm that reads the stream normalises over the dimensions still present (``×√(D/k)`` before it, ``÷√(D/k)``
  after it, ``k`` the non-zero gates), which is what the cut model's norm computes;
- the readers of heads and FFN neurons (``o_proj``, ``down_proj``) scale their inputs by the head-group and neuron
  gates; each layer has two layer gates, one scaling its attention's writer and one its MLP's (the paper's
  separate attention and MLP masks), so a closed gate leaves that half of the block an identity. The layers kept
  at the end are the ``num_hidden_layers`` with the largest sum of the two ``log α`` (a stock model keeps or drops
  whole layers); each kept half folds its own gate's value.

In training mode the gates are hard-concrete samples (one per forward pass), in eval mode deterministic with
exactly the target counts, so the masked model in eval mode computes what the cut model computes. :meth:`cut`
folds the deterministic gates into the weights and removes what they closed through the engine (``plan_cuts``,
``Step`` with a ``Drop`` of layers), as plain data that :func:`lightning_prune.restore` replays.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.cuts import Drop, Step, check_steps
from lightning_prune.depth import find_blocks
from lightning_prune.errors import PruningError
from lightning_prune.graph.groups import Group, build_graph
from lightning_prune.measure import count_params
from lightning_prune.methods.llm_pruner import embedding_paths
from lightning_prune.methods.shear_masks import (
    DAMPING,
    Lagrangian,
    ShearTarget,
    dense_shape,
    deterministic_gates,
    expected_gates,
    initial_log_alpha,
    sample_gates,
    target_shape,
)
from lightning_prune.planning import plan_cuts
from lightning_prune.record import new_record
from lightning_prune.running import ExampleInputs
from lightning_prune.selection import Plan
from lightning_prune.surgery import apply_step

# gate kind -> the config field its count is
QUANTITIES = {
    "hidden": "hidden_size",
    "heads": "num_key_value_heads",
    "ffn": "intermediate_size",
    "layers": "num_hidden_layers",
}
LAYER_GATES = ("layers_attention", "layers_mlp")  # a block's attention and MLP halves


@dataclass
class Site:
    """Gates ``gate`` scale the last dimension of ``module``'s input or output (``side``); ``elements[c]`` is
    the gate of channel ``c``."""

    module: str
    side: str
    gate: str
    elements: Tensor


@dataclass
class ShearResult:
    """What :meth:`Shearing.cut` did. ``record`` replays it on a fresh dense model (:func:`restore`)."""

    record: dict[str, Any]
    params_before: int
    params_after: int
    shape: dict[str, int]
    step: Step
    history: list[dict[str, float]] = field(default_factory=list)

    def __str__(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.shape.items())
        return f"sheared to {shape}: params {self.params_before:,} -> {self.params_after:,}"


def _elements(group: Group, member_index: int, size: int) -> Tensor:
    member = group.members[member_index]
    elements = torch.full((size,), -1, dtype=torch.long)
    elements[member.positions] = member.elements
    if (elements < 0).any():
        raise PruningError(f"`{member.slot.tensor}` dimension {member.slot.dim} is only partly in group {group.name}.")
    return elements


class Shearing:
    """Hard-concrete gates on a Hugging Face causal LM toward ``target``, their expected size and Lagrangian, and
    the final cut (see the module doc).

    Args:
        model: a Hugging Face causal LM (a ``PreTrainedModel`` with a ``config``); nothing changes until
            :meth:`attach` (hooks) or :meth:`cut`.
        target: a :class:`ShearTarget`, a dict of some of its fields, or a Hugging Face config.
        warmup: steps over which the constrained counts move linearly from the dense model's to the target's.
        droprate: the gates' initial drop rate (``log α = log(1 − d) − log d``; the paper: 0.5).
        damping: the quadratic multiplier's initial value (:class:`~lightning_prune.methods.shear_masks.Lagrangian`).
        example_inputs: inputs to trace the model with (default: 8 token ids).

    Raises:
        PruningError: a target larger than the model, a head count the family or the query/key-value ratio
            refuses, or a model whose layout is not a decoder stack; the model is unchanged.

    Example::

        shearing = Shearing(model, {"hidden_size": 96, "intermediate_size": 256})
        shearing.attach()           # train: loss + shearing.penalty(step), gates in the optimizer, and after each
                                    # step shearing.lagrangian.ascend(lr) for the multipliers
        result = shearing.cut()     # fold, cut: model.config now has the target shape
    """

    def __init__(
        self,
        model: nn.Module,
        target: Any,
        *,
        warmup: int = 0,
        droprate: float = 0.5,
        damping: float = DAMPING,
        example_inputs: ExampleInputs | None = None,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None:
            raise PruningError(f"`model` must be a Hugging Face causal LM with a `config`, got {type(model).__name__}.")
        if not 0.0 < droprate < 1.0:
            raise PruningError(f"`droprate` must be in (0, 1), got {droprate!r}.")
        self.target = ShearTarget.from_any(target)
        if not self.target.to_dict():
            raise PruningError(
                f"`target` names no field: give at least one of {', '.join(ShearTarget.__dataclass_fields__)}."
            )
        self.shape = target_shape(config, self.target)
        self.model, self.dense_shape = model, dense_shape(config)
        asked = set(self.target.to_dict())
        kinds = [
            k for k, name in QUANTITIES.items() if name in asked or (k == "heads" and "num_attention_heads" in asked)
        ]
        if example_inputs is None:
            example_inputs = {"input_ids": torch.zeros(1, 8, dtype=torch.long), "use_cache": False}
        self.graph = build_graph(model, example_inputs)
        self.blocks = find_blocks(model)
        self.layers = len(model.get_submodule(self.blocks))
        self._find_groups()
        self.counts = {k: self.shape[QUANTITIES[k]] for k in kinds}
        size = {"hidden": self.stream.width, **dict.fromkeys(LAYER_GATES, self.layers)}
        size.update({f"heads_{i}": g.width for i, g in enumerate(self.head_groups)})
        size.update({f"ffn_{i}": g.width for i, g in enumerate(self.ffn_groups)})
        start = initial_log_alpha(droprate)
        device = next(model.parameters()).device
        self.log_alpha = nn.ParameterDict(
            {
                key: nn.Parameter(torch.full((width,), start, device=device))
                for key, width in size.items()
                if key.partition("_")[0] in kinds
            }
        )
        self._sites, self._norms, self._dims, self._halves = self._find_sites()
        dense = {QUANTITIES[k]: self.dense_shape[QUANTITIES[k]] for k in kinds}
        with torch.no_grad():
            start = {name: float(count) for name, count in self.expected().items()}
        self.lagrangian = Lagrangian(dense, {QUANTITIES[k]: self.counts[k] for k in kinds}, warmup, start, damping)
        self.lagrangian.multipliers.to(device)
        self._handles: list[Any] = []
        self._gates: dict[str, Tensor] | None = None

    # --- layout -----------------------------------------------------------------------------------
    def _find_groups(self) -> None:
        embeddings = {f"{path}.weight" for path in embedding_paths(self.model)}
        streams = [g for g in self.graph.groups if any(m.slot.tensor in embeddings for m in g.members)]
        if len(streams) != 1:
            raise PruningError(f"found {len(streams)} prunable groups holding the input embeddings, expected one.")
        self.stream = streams[0]
        self.head_groups, self.ffn_groups = [], []
        for index in range(self.layers):
            prefix = f"{self.blocks}.{index}."
            inside = [g for g in self.graph.groups if all(m.slot.tensor.startswith(prefix) for m in g.members)]
            heads = [g for g in inside if any(m.positions.numel() > g.width for m in g.members_with_role("in"))]
            ffn = [g for g in inside if g not in heads]
            if len(heads) != 1 or len(ffn) != 1:
                raise PruningError(
                    f"block `{prefix[:-1]}` has {len(heads)} head groups and {len(ffn)} neuron groups in the traced "
                    "graph; shearing needs one of each (attention heads, FFN neurons) per block."
                )
            if heads[0].width != self.dense_shape["num_key_value_heads"]:
                raise PruningError(
                    f"block `{prefix[:-1]}` traces {heads[0].width} head groups, the config has "
                    f"{self.dense_shape['num_key_value_heads']} key/value heads."
                )
            self.head_groups.append(heads[0])
            self.ffn_groups.append(ffn[0])

    def _find_sites(
        self,
    ) -> tuple[list[Site], list[str], dict[tuple[str, int], tuple[str, Tensor]], dict[str, str]]:
        tensors = dict(self.model.named_parameters())
        sites, norms, dims = [], [], {}
        layered = "layers" in self.counts
        halves = {  # tensor -> the layer gate of its half of the block (norms have none: both halves count them)
            m.slot.tensor: gate
            for groups, gate in ((self.head_groups, LAYER_GATES[0]), (self.ffn_groups, LAYER_GATES[1]))
            for group in groups
            for m in group.members
        }
        gated = [("hidden", self.stream)]
        gated += [(f"heads_{i}", g) for i, g in enumerate(self.head_groups)]
        gated += [(f"ffn_{i}", g) for i, g in enumerate(self.ffn_groups)]
        for key, group in gated:
            if key not in self.log_alpha and not (key == "hidden" and layered):
                continue
            for number, member in enumerate(group.members):
                slot = member.slot
                module = slot.tensor.rpartition(".")[0]
                elements = _elements(group, number, tensors[slot.tensor].shape[slot.dim])
                if key in self.log_alpha:
                    dims[(slot.tensor, slot.dim)] = (key, elements)
                layer = self._block_of(slot.tensor)
                writer = slot.role == "out" and slot.tensor.endswith(".weight")
                if key == "hidden" and writer and layered and layer is not None:
                    if slot.tensor not in halves:
                        raise PruningError(
                            f"`{slot.tensor}` writes the stream inside block {layer} but belongs to neither its head "
                            "group nor its neuron group: shearing cannot tell which layer gate scales it."
                        )
                    sites.append(Site(module, "output", halves[slot.tensor], torch.full_like(elements, layer)))
                if key not in self.log_alpha:
                    continue
                if key == "hidden" and writer:
                    sites.append(Site(module, "output", key, elements))
                elif (
                    key == "hidden" and slot.role == "follow" and "norm" in type(self._module(module)).__name__.lower()
                ):
                    norms.append(module)
                elif key != "hidden" and slot.role == "in":
                    sites.append(Site(module, "input", key, elements))
        for site in sites:
            kind = type(self._module(site.module))
            if kind is not nn.Linear and not (kind is nn.Embedding and site.side == "output"):
                raise PruningError(
                    f"`{site.module}` ({kind.__name__}) would carry shearing gates on its {site.side}; only "
                    "nn.Linear and nn.Embedding layers can, so the gates fold into their weights."
                )
        return sites, norms, dims, halves if layered else {}

    def _module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path)

    def _block_of(self, tensor: str) -> int | None:
        prefix = f"{self.blocks}."
        index = tensor[len(prefix) :].partition(".")[0] if tensor.startswith(prefix) else ""
        return int(index) if index.isdigit() else None

    # --- gates ------------------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        """The gates' ``log α`` (minimised with the model)."""
        return list(self.log_alpha.values())

    def multipliers(self) -> list[nn.Parameter]:
        """The Lagrange multipliers (maximised by ``self.lagrangian.ascend(lr)`` after each step)."""
        return list(self.lagrangian.multipliers.values())

    def gates(self, deterministic: bool) -> dict[str, Tensor]:
        """Every gate: a hard-concrete sample, or deterministic with exactly the target counts."""
        if not deterministic:
            return {key: sample_gates(log_alpha) for key, log_alpha in self.log_alpha.items()}
        gates = {
            key: deterministic_gates(a, self.counts[key.partition("_")[0]])
            for key, a in self.log_alpha.items()
            if key not in LAYER_GATES
        }
        if "layers" in self.counts:  # whole layers stay: ranked by both halves together
            ranking = sum(self.log_alpha[key].detach() for key in LAYER_GATES)
            for key in LAYER_GATES:
                gates[key] = deterministic_gates(self.log_alpha[key], self.counts["layers"], ranking)
        return gates

    def expected(self) -> dict[str, Tensor]:
        """Expected counts of every constrained config field (per layer for heads and FFN), and of parameters."""
        keep = {key: expected_gates(log_alpha) for key, log_alpha in self.log_alpha.items()}
        counts: dict[str, Tensor] = {}
        for kind in self.counts:
            per_layer = [keep[key].sum() for key in keep if key.partition("_")[0] == kind]
            counts[QUANTITIES[kind]] = torch.stack(per_layer).sum() / len(per_layer)  # layers: both halves
        total = torch.zeros((), device=next(iter(keep.values())).device) if keep else torch.zeros(())
        for name, tensor in self.model.named_parameters():
            size = total.new_ones(())
            for dim, width in enumerate(tensor.shape):
                gate = self._dims.get((name, dim))
                size = size * (keep[gate[0]][gate[1].to(size.device)].sum() if gate else width)
            layer = self._block_of(name)
            if self._halves and layer is not None:
                half = self._halves.get(name)
                gates = [keep[half][layer]] if half else [keep[key][layer] for key in LAYER_GATES]
                size = size * torch.stack(gates).mean()
            total = total + size
        counts["params"] = total
        return counts

    def penalty(self, step: int) -> Tensor:
        """The Lagrangian at ``step`` (add it to the loss)."""
        return self.lagrangian(self.expected(), step)

    # --- hooks ------------------------------------------------------------------------------------
    def attach(self) -> None:
        """Gate the model through hooks: samples in training mode, deterministic gates in eval mode."""
        if self._handles:
            return
        device = next(self.model.parameters()).device
        for site in self._sites:
            site.elements = site.elements.to(device)
        self._dims = {key: (gate, elements.to(device)) for key, (gate, elements) in self._dims.items()}

        def reset(module: nn.Module, args: Any) -> None:
            self._gates = None

        self._handles.append(self.model.register_forward_pre_hook(reset))
        for site in self._sites:
            module = self._module(site.module)
            if site.side == "output":
                self._handles.append(module.register_forward_hook(self._scale_output(site)))
            else:
                self._handles.append(module.register_forward_pre_hook(self._scale_input(site)))
        for path in self._norms:
            module = self._module(path)
            self._handles.append(module.register_forward_pre_hook(self._norm_scale(inverse=False)))
            self._handles.append(module.register_forward_hook(self._norm_scale(inverse=True)))

    def detach(self) -> None:
        """Remove every hook; the model computes as it did before :meth:`attach`."""
        for handle in self._handles:
            handle.remove()
        self._handles, self._gates = [], None

    def _current(self) -> dict[str, Tensor]:
        if self._gates is None:
            self._gates = self.gates(deterministic=not self.model.training)
        return self._gates

    def _scale(self, site: Site) -> Tensor:
        return self._current()[site.gate][site.elements]

    def _scale_output(self, site: Site) -> Callable[..., Tensor]:
        return lambda module, args, output: output * self._scale(site).to(output.dtype)

    def _scale_input(self, site: Site) -> Callable[..., tuple]:
        return lambda module, args: (args[0] * self._scale(site).to(args[0].dtype), *args[1:])

    def _stretch(self) -> Tensor:
        """``√(D/k)``: a norm over all D dimensions of a stream with k non-zero ones, against one over k."""
        gates = self._current()["hidden"]
        present = (gates != 0).sum().clamp(min=1)
        return torch.sqrt(gates.numel() / present.to(gates.dtype))

    def _norm_scale(self, inverse: bool) -> Callable[..., Any]:
        if inverse:
            return lambda module, args, output: output / self._stretch().to(output.dtype)
        return lambda module, args: (args[0] * self._stretch().to(args[0].dtype), *args[1:])

    # --- the cut ----------------------------------------------------------------------------------
    def step(self) -> Step:
        """The cuts and layer drop of the deterministic gates, as plain data."""
        gates = self.gates(deterministic=True)
        removed: dict[int, list[int]] = {}
        groups = {"hidden": self.stream}
        groups.update({f"heads_{i}": g for i, g in enumerate(self.head_groups)})
        groups.update({f"ffn_{i}": g for i, g in enumerate(self.ffn_groups)})
        for key, values in gates.items():
            if key not in LAYER_GATES:
                removed[groups[key].index] = (values == 0).nonzero().flatten().tolist()
        cuts = plan_cuts(self.graph, Plan(removed))
        drops = []
        if "layers" in self.counts:
            kept = (gates[LAYER_GATES[0]] != 0).nonzero().flatten().tolist()
            drops.append(Drop(self.blocks, self.layers, kept))
        return Step(cuts, drops)

    def fold(self) -> None:
        """Multiply the deterministic gates into the weights of the layers that carry them (no hooks after)."""
        self.detach()
        gates = self.gates(deterministic=True)
        with torch.no_grad():
            for site in self._sites:
                module = self._module(site.module)
                scale = gates[site.gate][site.elements.to(gates[site.gate].device)].to(module.weight)
                if site.side == "input" or isinstance(module, nn.Embedding):
                    module.weight.mul_(scale[None, :])
                else:
                    module.weight.mul_(scale[:, None])
                    if module.bias is not None:
                        module.bias.mul_(scale)

    def cut(self, optimizers: Iterable[torch.optim.Optimizer] = ()) -> ShearResult:
        """Fold the deterministic gates into the weights and cut the model to the target shape, in place.

        The optimizers' state is sliced alike (and loses the dropped layers' parameters).
        """
        step = self.step()
        check_steps(self.model, [step], "shearing")
        params_before = count_params(self.model)
        self.fold()
        apply_step(self.model, step, optimizers)
        shape = dense_shape(self.model.config)
        if shape != self.shape:
            raise PruningError(
                f"the cut model's config has {shape}, not the target {self.shape}: the family's integration did "
                "not follow the cut. Please report the model."
            )
        return ShearResult(new_record([step]), params_before, count_params(self.model), shape, step)
