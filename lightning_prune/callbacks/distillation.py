"""Distillation recovery: the dense model, frozen before the first cut, teaches the pruned one while it fine-tunes.

The callback wraps the module's ``training_step`` (an instance attribute set at ``setup``, removed at
``teardown``): the step runs as written, the first call it makes of the module or of one of its direct
submodules (``self(x)`` of an image classifier, ``self.model(input_ids=...)`` of :class:`~lightning_prune.CausalLM`)
is observed, the teacher's same module runs on the same inputs, and the returned loss becomes
``(1 − alpha)·task + alpha·distill``. Because the loss itself changes, Lightning's gradient accumulation,
AMP scaling and DDP reduction apply to it unchanged; the teacher lives on every rank, outside the module (not
in its ``state_dict``, parameters or optimizer), and nothing of it is reduced across ranks.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torchmetrics import Metric
from typing_extensions import override

from lightning_prune.callbacks.checkpoint import CHECKPOINT_KEY, applied_record, restore_pruned
from lightning_prune.callbacks.pruning import StructuredPruning
from lightning_prune.errors import PruningError
from lightning_prune.methods.distillation import logits_of, token_loss
from lightning_prune.methods.minillm import MiniLLMOptions, minillm_step
from lightning_prune.running import preserved_state

LOSSES = ("forward_kl", "reverse_kl", "minillm")
# Where, within an epoch, each `when` of StructuredPruning cuts: validation runs before the epoch's end hooks.
ORDER = {"train_epoch_start": 0, "validation_end": 1, "train_epoch_end": 2}
TEACHER_FILE = "distillation_teacher.pt"


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no gradients, without the callback's ``training_step`` wrapper."""
    teacher = copy.deepcopy(module)
    for name in ("training_step", "on_load_checkpoint"):
        vars(teacher).pop(name, None)
    return teacher.eval().requires_grad_(False)


def teacher_bytes(teacher: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*teacher.parameters(), *teacher.buffers()])


class _Call:
    """The first outermost call of the module or one of its direct submodules while armed."""

    def __init__(self, module: nn.Module) -> None:
        self.path: str | None = None
        self.args: tuple = ()
        self.kwargs: dict[str, Any] = {}
        self.output: Any = None
        self.depth = 0
        self.others: list[str] = []  # outermost calls after the first
        # metrics are submodules too, but not the model
        self.watched = {"": module} | {n: c for n, c in module.named_children() if not isinstance(c, Metric)}

    @contextlib.contextmanager
    def armed(self) -> Iterator[_Call]:
        handles = []
        for path, child in self.watched.items():
            handles.append(child.register_forward_pre_hook(self._before(path), with_kwargs=True))
            handles.append(child.register_forward_hook(self._after(path)))
        try:
            yield self
        finally:
            for handle in handles:
                handle.remove()

    def _before(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            if self.depth == 0 and self.path is None:
                self.path, self.args, self.kwargs = path, args, dict(kwargs)
            elif self.depth == 0:
                self.others.append(path)
            self.depth += 1

        return hook

    def _after(self, path: str) -> Any:
        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            self.depth -= 1
            if self.depth == 0 and self.path == path and self.output is None:
                self.output = output

        return hook


class Distillation(Callback):
    r"""Recover a pruned model by distillation from the dense one: the loss becomes ``(1 − α)·task + α·distill``.

    The teacher is a frozen snapshot (eval mode, no gradients) of the module taken right before the first cut of
    the :class:`~lightning_prune.StructuredPruning` callbacks of the trainer, or ``teacher``, a model of your own
    (e.g. a bigger one) that takes the same inputs as the observed call. It costs one forward pass of the
    teacher per training step (MiniLLM: also ``new_tokens`` sampling passes of both models) and its memory, logged
    when it is taken. Before the snapshot the training step is unchanged. Each step logs ``distill/task`` and
    ``distill/loss`` (for MiniLLM a surrogate whose gradient is the estimate: its value may be negative).

    Distillation moves itself before the first pruning callback in ``trainer.callbacks`` at ``setup``, so that the
    snapshot is taken before the cut whatever the order they were listed in.

    Checkpoints: the module's ``state_dict`` never holds the teacher. With ``save_teacher=False`` its weights are
    written once, when the snapshot is taken, to ``distillation_teacher.pt`` beside the checkpoints (the first
    ``ModelCheckpoint``'s folder; nothing is written without one), and the callback's state keeps the file's path
    and the record of the teacher's architecture; with ``save_teacher=True`` every checkpoint carries the weights
    in the callback's state instead. ``fit(ckpt_path=...)`` rebuilds the teacher from the module as built before
    the checkpoint loads, cut to the teacher's record, with those weights. A teacher passed as ``teacher`` is
    never saved: pass it again to resume. The state is keyed by the class alone (one instance per trainer), so a
    resumed run finds its teacher even with another ``alpha``.

    Args:
        loss: ``"forward_kl"`` (Hinton KD at ``temperature``; Minitron's logit distillation),
            ``"reverse_kl"`` (token-level ``KL(student ‖ teacher)``: MiniLLM's single-step term) or ``"minillm"``
            (MiniLLM proper for a causal LM: sampled continuations, :mod:`lightning_prune.methods.minillm`; the
            task loss is then the paper's LM loss on pre-training text).
        alpha: the distillation share of the loss, in [0, 1].
        temperature: softens both distributions of the token losses (> 0; the loss is scaled by T²).
        teacher: a model to distil from instead of the snapshot.
        save_teacher: put the teacher's weights into every checkpoint (see above).
        prompt_tokens, new_tokens, mix, normalize_length: MiniLLM's sampling
            (:class:`~lightning_prune.methods.minillm.MiniLLMOptions`).
        seed: seeds MiniLLM's sampling (with the global step and the rank).

    Raises:
        PruningError: in ``__init__``, an unknown ``loss``, ``alpha`` outside [0, 1], ``temperature`` <= 0 or bad
            MiniLLM options; in ``setup``, no teacher and no pruning callback, manual optimization, a ``teacher``
            inside the module, or ``"minillm"`` for a module with no causal LM that can generate; in
            ``on_fit_start``, a ``teacher`` whose classes or vocabulary differ from the module's.

    Example::

        callbacks = [Distillation("forward_kl", alpha=0.5), StructuredPruning(0.5, "l1", start_epoch=5)]
        Trainer(max_epochs=20, callbacks=callbacks).fit(model, datamodule)
    """

    def __init__(
        self,
        loss: str = "forward_kl",
        alpha: float = 0.5,
        temperature: float = 1.0,
        teacher: nn.Module | None = None,
        save_teacher: bool = False,
        prompt_tokens: int = 16,
        new_tokens: int = 16,
        mix: float = 0.2,
        normalize_length: bool = True,
        seed: int = 0,
    ) -> None:
        if loss not in LOSSES:
            raise PruningError(f"`loss` must be one of {', '.join(LOSSES)}; got {loss!r}.")
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not 0 <= alpha <= 1:
            raise PruningError(f"`alpha` (the distillation share of the loss) must be in [0, 1], got {alpha!r}.")
        if isinstance(temperature, bool) or not isinstance(temperature, int | float) or not temperature > 0:
            raise PruningError(f"`temperature` must be a number > 0, got {temperature!r}.")
        if teacher is not None and not isinstance(teacher, nn.Module):
            raise PruningError(f"`teacher` must be a torch.nn.Module or None, got {type(teacher).__name__}.")
        self.sampling = MiniLLMOptions(prompt_tokens, new_tokens, mix, normalize_length)
        self.loss, self.alpha, self.temperature = loss, alpha, temperature
        self.save_teacher, self.seed = save_teacher, seed
        self.user_teacher = teacher.eval().requires_grad_(False) if teacher is not None else None
        self.teacher: nn.Module | None = self.user_teacher
        self.snapshot_epoch: int | None = None
        self.teacher_file: str | None = None
        self._plan: tuple[int, str] | None = None
        self._skeleton: nn.Module | None = None
        self._generator_path: str | None = None
        self._wrapped: dict[str, Any] = {}

    @property
    def source(self) -> str:
        return "teacher" if self.user_teacher is not None else "snapshot before the first cut"

    # --- before training ------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise PruningError(
                "Distillation changes the loss `training_step` returns, which manual optimization ignores: use "
                "automatic optimization, or add the distillation loss yourself before `manual_backward`."
            )
        prunings = [c for c in trainer.callbacks if isinstance(c, StructuredPruning)]
        if self.user_teacher is None and not prunings:
            raise PruningError(
                "Distillation has no teacher: pass `teacher` (a model), or add a StructuredPruning callback, before "
                "whose first cut the dense model is kept as the teacher."
            )
        given = self.user_teacher.parameters() if self.user_teacher is not None else []
        shared = {id(p) for p in pl_module.parameters()} & {id(p) for p in given}
        if shared:
            raise PruningError(
                f"`teacher` shares {len(shared)} parameters with {type(pl_module).__name__}: it would train and be "
                "saved with it. Pass a separate copy (e.g. `copy.deepcopy(model)`)."
            )
        if prunings:
            first = min(((min(c.steps), ORDER[c.when]), c.when) for c in prunings)
            self._plan = (first[0][0], first[1])
            mine, theirs = trainer.callbacks.index(self), trainer.callbacks.index(prunings[0])
            if mine > theirs:  # safe inside this hook's loop: only callbacks already called move
                trainer.callbacks.insert(theirs, trainer.callbacks.pop(mine))
        if self.loss == "minillm":
            self._generator_path = _generator(pl_module)
        self._wrap(pl_module)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unwrap(pl_module)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._unwrap(pl_module)  # a failed fit leaves the module as it was given

    def _unwrap(self, pl_module: pl.LightningModule) -> None:
        for name, wrapper in self._wrapped.items():
            if vars(pl_module).get(name) is wrapper:
                delattr(pl_module, name)
        self._wrapped, self._skeleton = {}, None

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is not None:
            self.teacher.to(pl_module.device)
        if self.user_teacher is not None and pl_module.example_input_array is not None:
            _check_outputs(pl_module, self.user_teacher, pl_module.example_input_array)

    # --- the snapshot -----------------------------------------------------------------------------
    def before_first_cut(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Called by a callback that cuts outside the epoch hooks (PruneBeforeSharding, in ``setup``, before the
        strategy shards the model): the teacher is the whole dense model on every rank."""
        if self.teacher is None and self.user_teacher is None:
            self._take(trainer, pl_module)
            # a resumed run cuts again here (Lightning names no checkpoint before `setup`): the teacher's weights
            # then load from the checkpoint into this dense copy
            self._skeleton = self.teacher

    def _due(self, trainer: pl.Trainer, when: str) -> bool:
        plan = self._plan
        return self.teacher is None and plan is not None and plan == (trainer.current_epoch, when)

    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.teacher is None and self._plan is not None and self._plan[0] < trainer.current_epoch:
            self._take(trainer, pl_module)  # a resumed run the pruning catches up on (its on_train_start)

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer, "train_epoch_start"):
            self._take(trainer, pl_module)

    @override
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.training and self._due(trainer, "validation_end"):
            self._take(trainer, pl_module)

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._due(trainer, "train_epoch_end"):
            self._take(trainer, pl_module)

    def _take(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.teacher, self.snapshot_epoch = frozen_copy(pl_module), trainer.current_epoch
        folder = getattr(trainer.checkpoint_callback, "dirpath", None)
        if not self.save_teacher and folder is not None:
            self.teacher_file = str(Path(folder).resolve() / TEACHER_FILE)
            if trainer.is_global_zero:
                _write(self.teacher.state_dict(), Path(self.teacher_file))
        megabytes = teacher_bytes(self.teacher) / 2**20
        rank_zero_info(
            f"Distillation: teacher = the model before the first cut (epoch {trainer.current_epoch}): "
            f"{sum(p.numel() for p in self.teacher.parameters()):,} parameters, {megabytes:.2f} MiB on "
            f"{pl_module.device}; one extra forward pass per training step ({self.loss})"
        )

    # --- the loss ---------------------------------------------------------------------------------
    def _wrap(self, pl_module: pl.LightningModule) -> None:
        step, load = pl_module.training_step, pl_module.on_load_checkpoint  # the class's, or the instance's own

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            state = (checkpoint.get("callbacks") or {}).get(self.state_key) or {}
            if state.get("source") == "snapshot" and self.user_teacher is None and self._skeleton is None:
                self._skeleton = frozen_copy(pl_module)  # as built, before the checkpoint cuts it and its weights load
            load(checkpoint)

        def training_step(*args: Any, **kwargs: Any) -> Any:
            if self.teacher is None:
                return step(*args, **kwargs)
            with _Call(pl_module).armed() as call:
                output = step(*args, **kwargs)
            if output is None:
                return None
            task = output["loss"] if isinstance(output, dict) else output
            distill = self._distill(pl_module, call)
            loss = (1 - self.alpha) * task + self.alpha * distill
            pl_module.log_dict({"distill/loss": distill.detach(), "distill/task": task.detach()})
            return {**output, "loss": loss} if isinstance(output, dict) else loss

        self._wrapped = {"training_step": training_step, "on_load_checkpoint": on_load_checkpoint}
        for name, wrapper in self._wrapped.items():
            setattr(pl_module, name, wrapper)

    def _teacher_module(self, pl_module: nn.Module, path: str) -> nn.Module:
        teacher = self.teacher
        assert teacher is not None
        same_kind = self.user_teacher is None or isinstance(teacher, type(pl_module))
        return teacher.get_submodule(path) if same_kind else teacher

    def _distill(self, pl_module: pl.LightningModule, call: _Call) -> Tensor:
        if call.path is None or call.output is None:
            raise PruningError(
                f"Distillation saw no call of {type(pl_module).__name__} or its direct submodules in `training_step`: "
                "call the model as `self(x)` or `self.net(x)` (not `.forward(x)`), so that its inputs can be given to "
                "the teacher."
            )
        if call.others:
            called = ", ".join(f"`{path or type(pl_module).__name__}`" for path in [call.path, *call.others])
            raise PruningError(
                f"`training_step` of {type(pl_module).__name__} calls {called} one after the other: Distillation gives "
                "the teacher the inputs of one call and compares its output as logits. Compute the logits in one call, "
                "e.g. through `self(x)` with a `forward` that runs them all."
            )
        if self.loss == "minillm":
            ids = call.kwargs.get("input_ids", call.args[0] if call.args else None)
            if not isinstance(ids, Tensor) or ids.ndim != 2:
                raise PruningError(
                    f"`loss='minillm'` takes its prompts from the token ids given to `{call.path}`, but it was called "
                    f"without `input_ids` of shape (batch, tokens) (got {type(ids).__name__})."
                )
            path = self._generator_path or ""
            student = pl_module.get_submodule(path)
            generator = torch.Generator(device=ids.device).manual_seed(
                self.seed + 1_000_003 * pl_module.global_step + 7919 * pl_module.global_rank
            )
            loss, _ = minillm_step(student, self._teacher_module(pl_module, path), ids, self.sampling, generator)
            return loss
        kwargs = {k: v for k, v in call.kwargs.items() if k != "labels"}  # the teacher's loss is not needed
        with torch.no_grad():
            teacher_output = self._teacher_module(pl_module, call.path)(*call.args, **kwargs)
        student = logits_of(call.output, f"the output of {call.path or type(pl_module).__name__}")
        teacher = logits_of(teacher_output, "the teacher's output")
        mask = call.kwargs.get("attention_mask")
        mask = mask.bool() if isinstance(mask, Tensor) and mask.shape == student.shape[:-1] else None
        return token_loss(self.loss)(student, teacher, temperature=self.temperature, mask=mask)

    # --- checkpoints ------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"loss": self.loss, "source": None, "epoch": self.snapshot_epoch}
        if self.user_teacher is not None:
            state["source"] = "teacher"
        elif self.teacher is not None:
            state.update(source="snapshot", record=applied_record(self.teacher), file=self.teacher_file)
            if self.save_teacher:
                state["weights"] = {k: v.detach().cpu() for k, v in self.teacher.state_dict().items()}
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        source = state_dict.get("source")
        if source == "teacher" and self.user_teacher is None:
            raise PruningError(
                "this checkpoint was trained with a `teacher` of its own, which checkpoints do not hold: pass the same "
                "`teacher` to Distillation to resume."
            )
        if source != "snapshot" or self.user_teacher is not None:
            return
        weights = state_dict.get("weights")
        path = state_dict.get("file")
        if weights is None:
            if not path or not Path(path).is_file():
                raise PruningError(
                    f"the teacher of this run was written to {path!r}, which does not exist (and the checkpoint holds "
                    "no teacher: `save_teacher` was False). Put the file back, or resume with `teacher=` a model."
                )
            weights = torch.load(path, map_location="cpu", weights_only=True)
        if self._skeleton is None:
            raise PruningError(
                "Distillation: a snapshot teacher is rebuilt only in `trainer.fit(model, ckpt_path=...)`."
            )
        teacher = self._skeleton
        restore_pruned(teacher, {CHECKPOINT_KEY: {"record": state_dict["record"]}}, "the teacher's record")
        _copy_weights(teacher, weights)
        self.teacher, self.snapshot_epoch, self.teacher_file, self._skeleton = teacher, state_dict["epoch"], path, None


def _generator(pl_module: nn.Module) -> str:
    """The path of the outermost submodule that can generate (a Hugging Face causal LM), for MiniLLM's sampling."""
    for path, module in pl_module.named_modules():
        can = getattr(module, "can_generate", None)
        if callable(can) and can():
            return path
    raise PruningError(
        f"`loss='minillm'` samples continuations, but {type(pl_module).__name__} holds no model that can generate (a "
        "Hugging Face causal LM, e.g. CausalLM's `model`). Use loss='forward_kl' or 'reverse_kl' for this model."
    )


def _check_outputs(pl_module: nn.Module, teacher: nn.Module, example: Any) -> None:
    """Refuse a teacher whose predictions are over other classes or another vocabulary than the module's."""
    with torch.no_grad(), preserved_state(pl_module):
        call = (lambda m: m(**example)) if isinstance(example, dict) else (lambda m: m(example))
        student, theirs = logits_of(call(pl_module)), logits_of(call(teacher), "the teacher's output")
    if student.shape[-1] != theirs.shape[-1]:
        raise PruningError(
            f"`teacher` predicts over {theirs.shape[-1]} classes or tokens, {type(pl_module).__name__} over "
            f"{student.shape[-1]}: distillation needs the same output vocabulary or classes."
        )


def _write(state: dict[str, Tensor], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    torch.save({k: v.detach().cpu() for k, v in state.items()}, partial)
    os.replace(partial, path)


def _copy_weights(teacher: nn.Module, weights: dict[str, Tensor]) -> None:
    own = teacher.state_dict()
    if set(own) != set(weights) or any(own[k].shape != weights[k].shape for k in own):
        raise PruningError(
            "the saved teacher does not fit the module rebuilt from the teacher's record: it was written by another "
            "model or run. Resume with the checkpoints and teacher file of one run."
        )
    with torch.no_grad():
        for key, tensor in own.items():
            tensor.copy_(weights[key])
