"""Deployment: a pruned model leaves as a ``torch.export`` program or an ONNX file that computes what it computes.

A pruned model is a plain ``nn.Module`` of smaller layers, so the stock exporters take it as they take any model;
what this module adds is the check a user would otherwise skip. :func:`export_onnx` writes the file atomically,
runs it in ONNX Runtime on the example inputs (and on ``check_inputs``, e.g. another batch size, to exercise the
dynamic dimensions) and refuses a file whose outputs differ from the eager model's beyond ``atol + rtol·|y|``;
:func:`export_program` does the same for ``torch.export``. :class:`OnnxModule` wraps an ONNX Runtime session as a
module, so :func:`lightning_prune.compare_latency` times the exported dense and pruned models side by side
exactly as it times eager ones.

Inputs are what :func:`lightning_prune.running.run_model` takes: a tensor, a tuple or a mapping. Non-tensor
values of a mapping (``use_cache=False``) are bound as constants; the tensors become the graph's inputs, named
by their keys (``input_0``, ``input_1`` … for positional inputs). The output is the model's tensor, its tuple
of tensors, or the ``logits`` of a Hugging Face output.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from lightning_prune.errors import PruningError
from lightning_prune.measure import compare_latency
from lightning_prune.running import ExampleInputs, preserved_state

EXPORTERS = ("dynamo", "torchscript")


class _Bound(nn.Module):
    """``model`` called with its tensor inputs as positional arguments and its other inputs bound; returns
    tensors only (the ``logits`` of a Hugging Face output)."""

    def __init__(self, model: nn.Module, names: Sequence[str], constants: Mapping[str, Any], keyword: bool) -> None:
        super().__init__()
        self.model, self.names, self.constants, self.keyword = model, tuple(names), dict(constants), keyword

    def forward(self, *tensors: Tensor) -> Any:
        if self.keyword:
            output = self.model(**dict(zip(self.names, tensors, strict=True)), **self.constants)
        else:
            output = self.model(*tensors)
        return tensor_outputs(output)


def tensor_outputs(output: Any) -> Tensor | tuple[Tensor, ...]:
    """The tensors of a model's output: a tensor, a tuple/list of tensors, or a mapping's ``logits``."""
    if isinstance(output, Tensor):
        return output
    if isinstance(output, Mapping) and isinstance(output.get("logits"), Tensor):
        return output["logits"]
    if isinstance(output, tuple | list) and output and all(isinstance(item, Tensor) for item in output):
        return tuple(output)
    raise PruningError(
        f"cannot export a model whose output is {type(output).__name__}: export needs a tensor, a tuple of tensors "
        "or a Hugging Face output with `logits`. Wrap the model in a module that returns its tensors."
    )


def _split(example_inputs: ExampleInputs) -> tuple[list[str], list[Tensor], dict[str, Any], bool]:
    """Names and tensors of the graph's inputs, the bound constants, and whether the model takes keywords."""
    if isinstance(example_inputs, Mapping):
        names = [key for key, value in example_inputs.items() if isinstance(value, Tensor)]
        constants = {key: value for key, value in example_inputs.items() if not isinstance(value, Tensor)}
        tensors, keyword = [example_inputs[name] for name in names], True
    else:
        items = list(example_inputs) if isinstance(example_inputs, tuple | list) else [example_inputs]
        if not all(isinstance(item, Tensor) for item in items):
            kinds = [type(item).__name__ for item in items]
            raise PruningError(f"positional example inputs must all be tensors to export, got {kinds}.")
        names, tensors, constants, keyword = [f"input_{i}" for i in range(len(items))], items, {}, False
    if not tensors:
        raise PruningError("the example inputs hold no tensor: export needs at least one tensor input.")
    return names, tensors, constants, keyword


def _check_dims(dynamic_dims: Mapping[int, str], tensors: Sequence[Tensor], names: Sequence[str]) -> None:
    for name, tensor in zip(names, tensors, strict=True):
        for dim in dynamic_dims:
            if not -tensor.ndim <= dim < tensor.ndim:
                raise PruningError(
                    f"`dynamic_dims` names dimension {dim}, but input {name!r} has {tensor.ndim} dimensions "
                    f"(shape {tuple(tensor.shape)}). Name dimensions every tensor input has, e.g. {{0: 'batch'}}."
                )


def _dynamic_shapes(dynamic_dims: Mapping[int, str], count: int) -> tuple[dict[int, Any], ...]:
    return tuple({dim: torch.export.Dim.DYNAMIC for dim in dynamic_dims} for _ in range(count))


@dataclass(frozen=True)
class ExportCheck:
    """What an exported model computed against the eager one: the largest absolute difference over every checked
    input and output, and the largest ``|y|`` of the eager outputs (the scale of that difference)."""

    path: Path | None
    max_abs_error: float
    max_abs_output: float
    atol: float
    rtol: float


def _compare(expected: Any, got: Sequence[Tensor], atol: float, rtol: float, what: str) -> tuple[float, float]:
    expected = [expected] if isinstance(expected, Tensor) else list(expected)
    if len(expected) != len(got):
        raise PruningError(f"{what} returned {len(got)} outputs, the eager model {len(expected)}.")
    worst, scale = 0.0, 0.0
    for index, (want, have) in enumerate(zip(expected, got, strict=True)):
        want, have = want.detach().double(), have.detach().double().reshape(want.shape)
        error = (want - have).abs()
        worst, scale = max(worst, float(error.max())), max(scale, float(want.abs().max()))
        excess = error - (atol + rtol * want.abs())
        if bool((excess > 0).any()):
            raise PruningError(
                f"{what} differs from the eager model in output {index}: max |difference| {float(error.max()):.3g} "
                f"exceeds atol {atol:g} + rtol {rtol:g}·|y| (max |y| {float(want.abs().max()):.3g}). The exported "
                "file was not kept; try the other exporter, or loosen `atol`/`rtol` if the difference is rounding."
            )
    return worst, scale


def _graph_inputs(example_inputs: ExampleInputs, names: Sequence[str]) -> list[Tensor]:
    inputs = _split(example_inputs)
    if list(inputs[0]) != list(names):
        raise PruningError(f"`check_inputs` have the inputs {inputs[0]}, the example inputs {list(names)}.")
    return inputs[1]


def export_program(
    model: nn.Module,
    example_inputs: ExampleInputs,
    *,
    dynamic_dims: Mapping[int, str] | None = None,
    check_inputs: Sequence[ExampleInputs] = (),
    atol: float = 1e-5,
    rtol: float = 1e-4,
) -> torch.export.ExportedProgram:
    """``torch.export`` of ``model`` in eval mode, checked against the eager model on the example inputs and each
    of ``check_inputs``.

    Args:
        dynamic_dims: dimensions of every tensor input left dynamic, by index and name (``{0: "batch"}``;
            ``{0: "batch", 1: "sequence"}`` for token ids); None: static shapes.

    Raises:
        PruningError: a model ``torch.export`` cannot trace (with its message), or outputs that differ.
    """
    names, tensors, constants, keyword = _split(example_inputs)
    _check_dims(dynamic_dims or {}, tensors, names)
    bound = _Bound(model, names, constants, keyword)
    shapes = None
    if dynamic_dims:
        shapes = (_dynamic_shapes(dynamic_dims, len(tensors)),)  # forward(*tensors): one tuple of them
    with preserved_state(model), torch.no_grad():
        bound.eval()  # the model too: a wrapper left in training mode exports BatchNorm as in training
        try:
            program = torch.export.export(bound, tuple(tensors), dynamic_shapes=shapes)
        except Exception as error:
            _raise_own(error)
            raise PruningError(f"torch.export cannot trace {type(model).__name__}: {_first_line(error)}") from error
        module = program.module()
        for inputs in (example_inputs, *check_inputs):
            graph_inputs = _graph_inputs(inputs, names)
            expected = bound(*graph_inputs)
            got = module(*graph_inputs)
            _compare(expected, [got] if isinstance(got, Tensor) else list(got), atol, rtol, "the exported program")
    return program


def export_onnx(
    model: nn.Module,
    example_inputs: ExampleInputs,
    path: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    dynamic_dims: Mapping[int, str] | None = None,
    check_inputs: Sequence[ExampleInputs] = (),
    atol: float = 1e-4,
    rtol: float = 1e-4,
    opset: int | None = None,
) -> ExportCheck:
    """Write ``model`` (eval mode) to the ONNX file ``path`` and check it in ONNX Runtime.

    The file is written beside ``path`` and renamed onto it only once ONNX Runtime computed the eager model's
    outputs, within ``atol + rtol·|y|``, on the example inputs and each of ``check_inputs``: a failed export
    or check leaves no file (and an earlier one at ``path`` as it was).

    Args:
        exporter: ``"dynamo"`` (``torch.onnx.export(dynamo=True)``, the default of current torch; Hugging Face
            models need it) or ``"torchscript"`` (the older tracer: faster to export, fewer ops).
        dynamic_dims: dimensions of every tensor input left dynamic (``{0: "batch"}``); None: static shapes.
        opset: the ONNX opset (None: the exporter's default).

    Raises:
        PruningError: an unknown exporter, an op ONNX cannot express (named, from the exporter's message),
            outputs that differ, or ``onnxruntime`` missing.
    """
    if exporter not in EXPORTERS:
        raise PruningError(f"`exporter` must be one of {EXPORTERS}, got {exporter!r}.")
    session_class = _onnxruntime().InferenceSession
    names, tensors, constants, keyword = _split(example_inputs)
    _check_dims(dynamic_dims or {}, tensors, names)
    bound = _Bound(model, names, constants, keyword)
    target = Path(path)
    folder = target.with_name(f".{target.name}.partial-{os.getpid()}")  # the file and its external weights
    partial = folder / target.name
    options: dict[str, Any] = {"input_names": list(names), "opset_version": opset}
    if dynamic_dims and exporter == "dynamo":
        options["dynamic_shapes"] = (_dynamic_shapes(dynamic_dims, len(tensors)),)
    elif dynamic_dims:
        options["dynamic_axes"] = {name: dict(dynamic_dims) for name in names}
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with preserved_state(model), torch.no_grad():
            bound.eval()  # the model too: a wrapper left in training mode exports BatchNorm as in training
            try:
                with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    torch.onnx.export(bound, tuple(tensors), str(partial), dynamo=exporter == "dynamo", **options)
            except Exception as error:
                _raise_own(error)
                raise PruningError(
                    f"cannot export {type(model).__name__} to ONNX with the {exporter!r} exporter: "
                    f"{_first_line(error)} (try exporter={_other(exporter)!r}, or replace that op)."
                ) from error
            session = session_class(str(partial), providers=["CPUExecutionProvider"])
            worst, scale = 0.0, 0.0
            for inputs in (example_inputs, *check_inputs):
                graph_inputs = _graph_inputs(inputs, names)
                expected = bound(*graph_inputs)
                feed = {name: tensor.detach().cpu().numpy() for name, tensor in zip(names, graph_inputs, strict=True)}
                got = [torch.from_numpy(array) for array in session.run(None, feed)]
                error, size = _compare(expected, got, atol, rtol, "ONNX Runtime")
                worst, scale = max(worst, error), max(scale, size)
        for written in sorted(folder.iterdir(), key=lambda file: file == partial):  # the weights first
            os.replace(written, target.parent / written.name)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return ExportCheck(target, worst, scale, atol, rtol)


class OnnxModule(nn.Module):
    """An ONNX Runtime session called like the module it was exported from (same inputs, tensors out), on
    ``threads`` intra-op threads (None: ONNX Runtime's default), so it can be timed and compared like one."""

    def __init__(self, path: str | os.PathLike[str], threads: int | None = None) -> None:
        super().__init__()
        runtime = _onnxruntime()
        options = runtime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = runtime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.names = [node.name for node in self.session.get_inputs()]

    def forward(self, *args: Tensor, **kwargs: Any) -> Tensor | tuple[Tensor, ...]:
        tensors = {**dict(zip(self.names, args, strict=False)), **{k: v for k, v in kwargs.items() if k in self.names}}
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise PruningError(f"the ONNX model needs the inputs {self.names}; missing {missing}.")
        outputs = self.session.run(None, {name: tensors[name].detach().cpu().numpy() for name in self.names})
        results = tuple(torch.from_numpy(array) for array in outputs)
        return results[0] if len(results) == 1 else results


def export_pair(
    dense: nn.Module,
    final: nn.Module,
    example_inputs: ExampleInputs,
    folder: str | os.PathLike[str],
    *,
    exporter: str = "dynamo",
    dynamic_dims: Mapping[int, str] | None = None,
    check_inputs: Sequence[ExampleInputs] = (),
    threads: int | None = None,
    min_run_time: float = 1.0,
) -> dict[str, Any]:
    """Export the dense and the final model to ``folder/dense.onnx`` and ``folder/model.onnx`` (each checked in
    ONNX Runtime by :func:`export_onnx`), then time both there in turns on ``example_inputs``.

    Returns:
        What a run's ``results.json`` records under ``"export"``: the exporter, each file with its largest
        deviation from the eager model, and the ONNX Runtime latencies (median, interquartile range) with their
        ratio, told (``onnx_latency_resolved``) only where the ranges are apart.
    """
    target = Path(folder)
    target.mkdir(parents=True, exist_ok=True)
    checks = {
        name: export_onnx(
            model, example_inputs, target / f"{file}.onnx", exporter=exporter, dynamic_dims=dynamic_dims,
            check_inputs=check_inputs,
        )
        for name, model, file in (("dense", dense, "dense"), ("final", final, "model"))
    }  # fmt: skip
    _, tensors, _, _ = _split(example_inputs)
    sessions = [OnnxModule(check.path, threads) for check in checks.values() if check.path is not None]
    timing = compare_latency(*sessions, tuple(tensors), threads=threads, min_run_time=min_run_time)
    return {
        "exporter": exporter,
        **{name: {"path": str(check.path), "max_abs_error": check.max_abs_error} for name, check in checks.items()},
        **{f"onnx_latency_{name}": {"median": spread.median, "low": spread.low, "high": spread.high}
           for name, spread in (("dense", timing.dense), ("final", timing.pruned))},
        "onnx_latency_ratio": timing.ratio,
        "onnx_latency_resolved": timing.resolved,
        "onnx_threads": timing.threads,
    }  # fmt: skip


def _onnxruntime() -> Any:
    try:
        import onnxruntime
    except ImportError as error:
        raise PruningError(
            "ONNX export is checked in ONNX Runtime: install it with `pip install onnx onnxruntime onnxscript`."
        ) from error
    return onnxruntime


def _raise_own(error: BaseException) -> None:
    """Raise the PruningError behind an exporter's error, if one of ours is (an output :func:`tensor_outputs`
    cannot export): its message says what to change, where the exporter's would point at the exporter."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, PruningError):
            raise error
        seen.add(id(error))
        error = error.__cause__ or error.__context__


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:400]


def _other(exporter: str) -> str:
    return next(name for name in EXPORTERS if name != exporter)
