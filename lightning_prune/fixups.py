"""How each layer type follows its sliced tensors: attribute updates, or a replacement layer.

After surgery a layer's tensors have their new shapes but its attributes (``in_channels``,
``num_features``, a head count ...) still hold the old ones. A *layer fixup* ``fixup(module)`` derives them
from the tensors, or returns a module to put in the layer's place when its class cannot express the new
shape. Fixups are registered by module class, or by the class's qualified name (``"package.module.Class"``)
for libraries that are not imported; a subclass uses its closest registered base. *Drop fixups*
``fixup(model, drop)`` run after blocks leave a block stack (a config that counts layers, say). *Rewrites*
``rewrite(model, options)`` replay a method's own changes that are not cuts (:class:`~lightning_prune.cuts.Rewrite`),
registered by the method under its kind. *Added tensors* ``add(module, name) -> bool`` give a freshly built layer a
tensor that its cut self has and its class does not build (a record or a saved folder names it), before the cuts.

This module owns the registries and the fixups of ``torch.nn``'s own layers; each library's layers are
registered by its file in :mod:`lightning_prune.integrations`.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lightning_prune.cuts import Drop, Rewrite
from lightning_prune.registry import Registry

LayerFixup = Callable[[nn.Module], "nn.Module | None"]
DropFixup = Callable[[nn.Module, Drop], None]

LAYER_FIXUPS: Registry[type | str, LayerFixup] = Registry(
    "layer fixup", "Register one with lightning_prune.register_layer(module_type, fixup)."
)
DROP_FIXUPS: Registry[str, DropFixup] = Registry("drop fixup")
REWRITES: Registry[str, Callable[[nn.Module, dict], None]] = Registry(
    "rewrite", "The method that wrote the record registers its kind when it is imported (lightning_prune.methods)."
)
ADDED_TENSORS: Registry[str, Callable[[nn.Module, str], bool]] = Registry("added tensor")


def add_tensor(module: nn.Module, name: str) -> bool:
    """Give ``module`` the tensor ``name`` it lacks, through the first added-tensor function that knows it."""
    return any(add(module, name) for add in ADDED_TENSORS.values())


def apply_rewrites(model: nn.Module, rewrites: list[Rewrite]) -> None:
    """Replay ``rewrites`` on ``model``, each through the function registered under its kind."""
    for rewrite in rewrites:
        REWRITES[rewrite.kind](model, rewrite.options)


def register_layer(module_type: type | str, fixup: LayerFixup, *, replace: bool = False) -> None:
    """Tell the engine how ``module_type`` updates its attributes after its tensors were sliced.

    ``fixup(module)`` is called once after surgery with the module's tensors already resized; it
    sets attributes such as ``in_features`` from the new shapes, or returns a module to put in its
    place when its class cannot express the new shape. ``module_type`` is a class, or the qualified
    name ``"package.module.Class"`` of one whose library should not be imported. Subclasses use their
    closest registered base type.
    """
    LAYER_FIXUPS.register(module_type, fixup, replace=replace)


def fixup_for(module: nn.Module) -> LayerFixup | None:
    """The fixup of the closest registered class in ``module``'s MRO, by class or by qualified name."""
    for klass in type(module).__mro__:
        fixup = LAYER_FIXUPS.get(klass) or LAYER_FIXUPS.get(f"{klass.__module__}.{klass.__qualname__}")
        if fixup is not None:
            return fixup
    return None


def _fix_conv(module: nn.modules.conv._ConvNd) -> None:
    weight = module.weight
    if module.transposed:
        module.in_channels = weight.shape[0]
        module.out_channels = weight.shape[1] * module.groups
        return
    if module.groups > 1 and module.in_channels == module.groups:  # depthwise: groups follow channels
        multiplier = module.out_channels // module.groups
        module.groups = weight.shape[0] // multiplier
        module.in_channels = module.groups
    else:
        module.in_channels = weight.shape[1] * module.groups
    module.out_channels = weight.shape[0]


def _fix_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def _fix_norm(module: nn.modules.batchnorm._NormBase) -> None:
    reference = module.weight if module.weight is not None else module.running_mean
    module.num_features = reference.shape[0]


def _fix_group_norm(module: nn.GroupNorm) -> None:
    module.num_channels = module.weight.shape[0]


def _fix_layer_norm(module: nn.LayerNorm) -> None:
    module.normalized_shape = tuple(module.weight.shape)


def _fix_embedding(module: nn.Embedding) -> None:
    module.embedding_dim = module.weight.shape[1]


def _fix_prelu(module: nn.PReLU) -> None:
    module.num_parameters = module.weight.numel()


for _type, _fixup in (
    (nn.modules.conv._ConvNd, _fix_conv),
    (nn.Linear, _fix_linear),
    (nn.modules.batchnorm._NormBase, _fix_norm),
    (nn.GroupNorm, _fix_group_norm),
    (nn.LayerNorm, _fix_layer_norm),
    (nn.RMSNorm, _fix_layer_norm),
    (nn.Embedding, _fix_embedding),
    (nn.PReLU, _fix_prelu),
):
    register_layer(_type, _fixup)
