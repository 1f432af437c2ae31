"""Pruned Hugging Face models as ``save_pretrained`` folders that always load again.

A pruned model whose layers all have the same widths is a stock model of its family: the config holds
its sizes (the integration keeps it in step) and ``AutoModelForCausalLM.from_pretrained`` rebuilds it.
Where layers differ (global selection, FLAP, layers left whole), no config value can say so.
:func:`save_pretrained` then writes, beside the weights, ``lightning_prune.json`` with the shape of every
tensor that differs from what the config builds, and :func:`from_pretrained` builds the model from its
config, cuts it to those shapes (through the same surgery as pruning, so every layer's attributes follow)
and loads the weights. The file also says which case a folder is in (``"stock"``), and lists a method's
rewrites that shapes cannot say (``"rewrites"``: SliceGPT's shortcut matrices), replayed before the cut.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.cuts import Cut, Rewrite, Step
from lightning_prune.errors import PruningError
from lightning_prune.fixups import add_tensor, apply_rewrites
from lightning_prune.running import named_tensors
from lightning_prune.surgery import apply_step

MANIFEST = "lightning_prune.json"
FORMAT = 1


def _architecture(config: Any) -> type[nn.Module]:
    import transformers

    names = getattr(config, "architectures", None) or []
    for name in names:
        if hasattr(transformers, name):
            return getattr(transformers, name)
    raise PruningError(
        f"the config names no architecture transformers knows ({names!r}): save the model with its own "
        "`save_pretrained`, which writes `architectures`."
    )


def _built_shapes(config: Any, kind: type[nn.Module]) -> dict[str, tuple[int, ...]]:
    """The shapes the stock class ``kind`` builds from ``config``, on the meta device (no memory)."""
    with torch.device("meta"):
        model = kind(config)
    return _shapes(model)


def _shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Every state-dict entry's shape, tied ones under each of their names (as ``save_pretrained`` sees them)."""
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def _differences(built: Mapping[str, tuple[int, ...]], saved: Mapping[str, tuple[int, ...]]) -> dict[str, list[int]]:
    return {name: list(shape) for name, shape in saved.items() if built.get(name) != tuple(shape)}


def _own_names(model: nn.Module, stock: bool) -> dict[str, bool]:
    """``save_pretrained`` options: a folder only :func:`from_pretrained` reads keeps the model's own tensor
    names. By default transformers converts some back to the family's checkpoint layout (Mixtral's fused
    experts one by one), which only the stock loader, at the config's widths, converts forth again."""
    import inspect

    if stock or "save_original_format" not in inspect.signature(model.save_pretrained).parameters:
        return {}
    return {"save_original_format": False}


def save_pretrained(model: nn.Module, folder: str | Path, tokenizer: Any = None) -> bool:
    """Write ``model`` (a pruned or dense Hugging Face ``PreTrainedModel``) into ``folder`` so that it loads again.

    The weights and config come from ``model.save_pretrained``; ``tokenizer`` (optional) is saved beside
    them; ``lightning_prune.json`` records the tensors whose shapes the config cannot express. The folder is
    written next to ``folder`` and moved into place at the end: a failure leaves no half-written model.

    Returns:
        ``True`` when the stock ``from_pretrained`` of the model's class rebuilds it (uniform widths), ``False``
        when only :func:`from_pretrained` does.

    Raises:
        PruningError: ``model`` is not a Hugging Face model (no ``save_pretrained`` and ``config``).
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise PruningError(
            f"`model` must be a Hugging Face PreTrainedModel (with `save_pretrained` and `config`), got "
            f"{type(model).__name__}; for a LightningModule such as CausalLM pass its `.model`."
        )
    folder = Path(folder)
    partial = folder.with_name(f".{folder.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        differences = _differences(_built_shapes(model.config, type(model)), _shapes(model))
        model.save_pretrained(partial, **_own_names(model, stock=not differences))
        if tokenizer is not None:
            tokenizer.save_pretrained(partial)
        rewrites = list(getattr(model, "_lightning_prune_rewrites", []))  # set by a method (SliceGPT)
        manifest = {"format": FORMAT, "stock": not differences, "shapes": differences, "rewrites": rewrites}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    if folder.exists():
        shutil.rmtree(folder)
    os.replace(partial, folder)
    return not differences


def _saved_state(folder: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise PruningError(f"`{folder}` holds no *.safetensors weights: save the model with `save_pretrained`.")
    state: dict[str, Tensor] = {}
    for path in files:
        state.update(load_file(path))
    return state


def _model_names(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state`` under the names of ``model``'s own state dict: ``save_pretrained`` writes some tensors under
    their family's checkpoint names (GPT-NeoX's ``lm_head`` as ``embed_out``), which its loader renames back."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, rename_source_key
    except ImportError:  # a transformers without checkpoint conversions saves the model's own names
        return state
    renamings = [c for c in get_model_conversion_mapping(model, add_legacy=False) if isinstance(c, WeightRenaming)]
    known = model.state_dict()
    renamed = {}
    for name, tensor in state.items():
        new_name = name if name in known else rename_source_key(name, renamings, [])[0]
        renamed[new_name if new_name in known else name] = tensor
    return renamed


def _cut_to(model: nn.Module, shapes: Mapping[str, tuple[int, ...]], where: str) -> None:
    """Cut ``model`` so that every tensor named in ``shapes`` has that shape (weights are loaded afterwards)."""
    for name in shapes:  # biases a method added (FLAP) where the config asks for none: zero, then cut and loaded
        path, _, leaf = name.rpartition(".")
        module = dict(model.named_modules()).get(path)
        if leaf == "bias" and isinstance(module, nn.Linear) and module.bias is None:
            module.bias = nn.Parameter(torch.zeros(module.out_features, dtype=module.weight.dtype))
        elif module is not None and not hasattr(module, leaf):  # a layer's own (BLOOM's kept heads)
            add_tensor(module, leaf)
    tensors = model.state_dict(keep_vars=True)
    cuts, seen = [], set()
    for name, shape in shapes.items():
        if name not in tensors:
            raise PruningError(
                f"{where}: the saved tensor `{name}` does not exist in a {type(model).__name__} built from the "
                "saved config. The folder was not written by this model's class."
            )
        if id(tensors[name]) in seen:  # a tied tensor, cut under its first name
            continue
        seen.add(id(tensors[name]))
        current = tuple(tensors[name].shape)
        if len(current) != len(shape) or any(s > c for s, c in zip(shape, current, strict=True)):
            raise PruningError(
                f"{where}: `{name}` is saved with shape {list(shape)} but the config builds {list(current)}: "
                "a pruned tensor can only be smaller. The config and the weights do not belong together."
            )
        owner = next(key for key, tensor in named_tensors(model).items() if tensor is tensors[name])
        cuts += [
            Cut(owner, dim, c, list(range(s))) for dim, (s, c) in enumerate(zip(shape, current, strict=True)) if s != c
        ]
    if cuts:
        apply_step(model, Step(cuts, []))


def from_pretrained(folder: str | Path, dtype: torch.dtype | None = None) -> nn.Module:
    """Load a model written by :func:`save_pretrained` (or a stock ``save_pretrained`` folder), in eval mode.

    Builds the model's own class from the saved config, cuts it to the saved shapes and loads the weights
    strictly (tied weights excepted), so the result computes what the saved model computed.

    Raises:
        PruningError: a folder that does not exist or holds no model, or weights that do not fit the config.
    """
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise PruningError(
            f"`folder` '{folder}' is not a saved model (no config.json): pass a folder written by "
            "`lightning_prune.save_pretrained` or `save_pretrained`."
        )
    config = AutoConfig.from_pretrained(folder)
    manifest = json.loads((folder / MANIFEST).read_text()) if (folder / MANIFEST).is_file() else {}
    if manifest.get("stock") and not manifest.get("rewrites"):  # the class's own loader reads its own format
        options = {} if dtype is None else {"dtype": dtype}  # (Mixtral's experts are written one by one)
        return _architecture(config).from_pretrained(folder, **options).eval()
    model = _architecture(config)(config)
    state = _model_names(model, _saved_state(folder))
    _load_into(model, state, manifest.get("rewrites", []), f"'{folder}'")
    if dtype is not None:
        model.to(dtype)
    return model.eval()


def _load_into(model: nn.Module, state: dict[str, Tensor], rewrites: list[dict], where: str, **load: Any) -> None:
    """Replay ``rewrites`` on ``model`` (built from its config), cut it to the shapes of ``state``, load ``state``."""
    apply_rewrites(model, [Rewrite.from_dict(r, where) for r in rewrites])
    _cut_to(model, _differences(_shapes(model), {k: tuple(v.shape) for k, v in state.items()}), where)
    missing, unexpected = model.load_state_dict(state, strict=False, **load)
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [name for name in missing if name not in tied and not _is_tied(model, name)]
    if missing or unexpected:
        raise PruningError(
            f"{where}: the weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}."
        )


def gathered(model: nn.Module) -> nn.Module | None:
    """A whole, unsharded copy of ``model`` (a Hugging Face model) on rank 0, for :func:`save_pretrained`.

    A model sharded by FSDP2's ``fully_shard`` holds only its slice of every tensor, and its class is a
    sharding subclass of its own: this gathers the full state dict to rank 0's CPU (a collective: call it on every
    rank) and loads it into a model of the original class, built on the meta device and cut to the pruned
    shapes, so no second copy of the weights is allocated. Buffers outside the state dict (not sharded) are copied.

    Returns:
        ``model`` itself when it is not sharded; the copy on rank 0; ``None`` on the other ranks.
    """
    from torch.distributed.fsdp import FSDPModule

    if not isinstance(model, FSDPModule):
        return model
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    original = next(kind for kind in type(model).__mro__ if not issubclass(kind, FSDPModule))
    with torch.device("meta"):
        copy = original(model.config)
    rewrites = list(getattr(model, "_lightning_prune_rewrites", []))
    _load_into(copy, state, rewrites, f"the gathered {original.__name__}", assign=True)
    if rewrites:
        copy._lightning_prune_rewrites = rewrites
    buffers = dict(model.named_buffers())
    for name, buffer in list(copy.named_buffers()):
        if buffer.is_meta:  # not in the state dict (rotary frequencies): the sharded model's own
            path, _, leaf = name.rpartition(".")
            copy.get_submodule(path)._buffers[leaf] = buffers[name].detach().cpu()
    copy.tie_weights()
    return copy.eval()


def _is_tied(model: nn.Module, name: str) -> bool:
    """Whether parameter ``name`` shares its storage with a parameter that was loaded (a tied LM head)."""
    parameters = dict(model.named_parameters(remove_duplicate=False))
    tensor = parameters.get(name)
    return tensor is not None and any(
        other is tensor and other_name != name for other_name, other in parameters.items()
    )
