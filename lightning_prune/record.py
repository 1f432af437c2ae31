"""Pruning records: what was removed, as plain data that survives ``torch.load(weights_only=True)``.

A record is ``{"format": "lightning-prune/record", "version": 1, "steps": [{"cuts": [...]}, ...]}``;
each step lists the cuts of one pruning call (and ``"layers"``: blocks dropped from block stacks;
``"rewrites"``: a method's own changes, replayed by kind), in order, relative to the model as it was then.
:func:`restore` replays a record on a freshly built dense model so that the pruned ``state_dict``
loads into it. Records are validated completely (and rehearsed on a meta copy of the model) before the
first tensor changes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from lightning_prune.cuts import Cut, Drop, Rewrite, Step, check_steps
from lightning_prune.errors import PruningError, RecordError, shown
from lightning_prune.fixups import REWRITES, add_tensor
from lightning_prune.running import meta_clone
from lightning_prune.surgery import apply_step

FORMAT = "lightning-prune/record"
VERSION = 1
MAX_STEPS = 10_000


def new_record(steps: Sequence[Step | Sequence[Cut]] = ()) -> dict[str, Any]:
    """A record of ``steps`` (each a :class:`Step`, or the cuts of one step)."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "steps": [(step if isinstance(step, Step) else Step(list(step))).to_dict() for step in steps],
    }


def merge_records(*records: Mapping[str, Any]) -> dict[str, Any]:
    """One record holding the steps of ``records`` in order."""
    steps: list = []
    for record in records:
        steps.extend(step for step in parse_record(record))
    return new_record(steps)


def parse_record(record: Any, where: str = "record") -> list[Step]:
    """The record's steps as cuts; raises :class:`RecordError` on anything malformed."""
    if not isinstance(record, Mapping):
        raise RecordError(f"{where}: expected a dict with keys format, version, steps; got {type(record).__name__}.")
    if record.get("format") != FORMAT:
        raise RecordError(f"{where}: `format` is {shown(record.get('format'))}, expected {FORMAT!r}.")
    version = record.get("version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise RecordError(f"{where}: `version` must be an integer, got {shown(version)}.")
    if version > VERSION:
        raise RecordError(
            f"{where}: record format version {version} is newer than this lightning-prune understands ({VERSION}); "
            "upgrade lightning-prune to load it."
        )
    steps = record.get("steps")
    if not isinstance(steps, list) or len(steps) > MAX_STEPS:
        raise RecordError(f"{where}: `steps` must be a list of at most {MAX_STEPS} steps.")
    parsed = []
    for number, step in enumerate(steps):
        if not isinstance(step, Mapping) or not isinstance(step.get("cuts"), list):
            raise RecordError(f"{where}: step {number} must be a dict with a list of `cuts`.")
        layers, rewrites = step.get("layers", []), step.get("rewrites", [])
        if not isinstance(layers, list) or not isinstance(rewrites, list):
            raise RecordError(f"{where}: step {number}: `layers` and `rewrites` must be lists.")
        here = f"{where} step {number}"
        cuts, drops = [Cut.from_dict(cut, here) for cut in step["cuts"]], [Drop.from_dict(d, here) for d in layers]
        parsed.append(Step(cuts, drops, [Rewrite.from_dict(r, here) for r in rewrites]))
    return parsed


def check_record(model: nn.Module, record: Any, where: str = "record") -> list[Step]:
    """Validate ``record`` against ``model`` without changing it.

    Names, dimensions, sizes and indices are checked first; then the steps are rehearsed on a copy of
    the model on the meta device (no memory), where layers reject what shapes alone allow, e.g. query
    heads that no longer divide evenly over their key/value heads.
    """
    steps = parse_record(record, where)
    check_steps(model, steps, where)
    unknown = sorted({r.kind for step in steps for r in step.rewrites if r.kind not in REWRITES})
    if unknown:
        raise RecordError(
            f"{where}: rewrites of kind {unknown} are not registered (known: {sorted(REWRITES)}). Import the method "
            "that wrote the record (`import lightning_prune` registers the built-in ones)."
        )
    rehearsal = meta_clone(model)
    try:
        for step in steps:
            apply_step(rehearsal, step)
    except PruningError as error:
        raise RecordError(f"{where}: {error}", module=error.module) from error
    except Exception as error:
        raise RecordError(
            f"{where}: the record passed its checks but failed on a copy of the model on the meta device "
            f"({type(error).__name__}: {str(error)[:200]}). It does not fit this model (or a registered layer "
            "fixup needs real tensors)."
        ) from error
    return steps


def add_recorded_biases(model: nn.Module, record: Any, where: str = "record") -> None:
    """Give every ``nn.Linear`` without a bias whose ``<linear>.bias`` the record cuts a zero bias (the same function),
    and every layer the other tensors the record cuts that it lacks (:data:`~lightning_prune.fixups.ADDED_TENSORS`:
    the kept heads of a BLOOM or Falcon attention layer, whose ALiBi slopes it selects).

    A method may add biases (FLAP's compensation does) and records each with a cut (keeping all of it where nothing
    is removed), so a model built from its original config can follow: call this before :func:`restore`.
    """
    import torch

    for step in parse_record(record, where):
        for cut in step.cuts:
            path, _, leaf = cut.tensor.rpartition(".")
            try:
                module = model.get_submodule(path)
            except AttributeError:
                continue  # check_record names it
            missing = leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None
            if missing and module.out_features == cut.size:
                weight = module.weight
                module.bias = nn.Parameter(torch.zeros(cut.size, dtype=weight.dtype, device=weight.device))
            elif not hasattr(module, leaf):
                add_tensor(module, leaf)


def restore(model: nn.Module, record: Mapping[str, Any]) -> None:
    """Apply ``record`` to a freshly built dense ``model`` so that the pruned ``state_dict`` loads into it.

    Raises:
        RecordError: if the record is malformed or does not fit the model; the model is unchanged.
    """
    add_recorded_biases(model, record)
    for step in check_record(model, record):
        apply_step(model, step)
