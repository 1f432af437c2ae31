"""Knowledge about layer families: each file holds one family's trace rules, fixups and replacement layers.

Files here reach down only into registries the core owns (:mod:`lightning_prune.graph.module_rules`,
:mod:`lightning_prune.graph.rules`, :mod:`lightning_prune.fixups`) and never import the library they
describe: layers are recognised by class name. The package loads every built-in family and every
third-party one declared under the entry-point group ``lightning_prune.integrations``::

    # pyproject.toml of a package that teaches lightning-prune its layers
    [project.entry-points."lightning_prune.integrations"]
    mylib = "mylib.pruning"   # a module that calls lightning_prune.register_layer(...) etc. when imported
"""

from __future__ import annotations

import importlib
import warnings
from importlib.metadata import entry_points

BUILT_IN = ("torch_attention", "torchvision", "timm", "huggingface", "hf_moe", "hf_alibi")
ENTRY_POINTS = "lightning_prune.integrations"


def load_integrations() -> list[str]:
    """Import the built-in families, then every installed third-party one; returns the modules loaded.

    A third-party integration that fails to import is skipped with a warning naming it: a broken plugin
    must not make the engine unusable.
    """
    loaded = []
    for name in BUILT_IN:
        loaded.append(importlib.import_module(f"{__name__}.{name}").__name__)
    for entry in entry_points(group=ENTRY_POINTS):
        try:
            entry.load()
        except Exception as error:
            warnings.warn(
                f"lightning-prune integration {entry.name!r} ({entry.value}) failed to load and is skipped: "
                f"{type(error).__name__}: {error}",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        loaded.append(entry.value)
    return loaded
