"""Pruning methods: what one step of a schedule does, chosen by name (``StructuredPruning(structure=...)``, Hydra).

A method is one module here, built from the public steps of the engine (``build_graph`` → ``score`` →
``select`` → ``plan_cuts`` → ``apply_cuts``, ``prune_layers`` ...), never a new path through the core. It is
a small object, configured at construction (validated there, before training), that implements:

- ``needs_gradients``: whether its scores need gradient statistics accumulated during training;
- ``to_dict()``: its configuration as plain data (logged, compared, written to results);
- ``check(model, example_inputs)``: what can only be checked on the model (``example_inputs`` may be None);
- ``step(model, example_inputs, amount, dense, *, optimizers, statistics)``: prune ``model`` in place until
  ``amount`` (cumulative, relative to ``dense``, the size before the first step) is reached, slicing the
  optimizers' state alike, and return a :class:`StepResult`.

Register a new one with ``METHODS.register(name, factory)`` (:mod:`base`); ``factory(**options)`` receives the
callback's method options.
"""

from lightning_prune.methods import (  # noqa: F401  (built-ins)
    channels,
    depth_methods,
    experts,
    flap,
    layers,
    llm_pruner,
    recovery,
    sheared,
    slicegpt_step,
)
from lightning_prune.methods.base import METHODS, Method, StepResult, get_method

__all__ = ["METHODS", "Method", "StepResult", "get_method"]
