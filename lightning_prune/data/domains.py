"""Several text domains kept apart, and training batches drawn from them by weights that can change during training
(Sheared-LLaMA's dynamic batch loading; :class:`~lightning_prune.callbacks.DynamicBatchLoading` updates them).

Offline default domains, both shipped with every Python: ``"pydoc"`` (the prose of ``pydoc_data.topics``) and
``"docstrings"`` (the docstrings of a fixed list of standard-library modules and their public members).
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Sampler

from lightning_prune.data.splits import SplitDataModule
from lightning_prune.data.text import Windows, default_tokenizer, load_tokenizer, pack, pydoc_documents, read_documents

STDLIB_MODULES = (
    "argparse", "collections", "contextlib", "csv", "dataclasses", "datetime", "decimal", "email", "fractions",
    "functools", "heapq", "http.client", "inspect", "itertools", "json", "logging", "os", "pathlib", "pickle",
    "random", "re", "shutil", "socket", "statistics", "string", "subprocess", "tarfile", "textwrap", "threading",
    "enum", "unittest", "urllib.parse", "uuid", "zipfile",
)  # fmt: skip


def stdlib_docstrings(modules: Sequence[str] = STDLIB_MODULES) -> list[str]:
    """One document per module: its docstring and those of its public classes and functions, in name order."""
    documents = []
    for name in modules:
        module = importlib.import_module(name)
        parts = [inspect.getdoc(module) or ""]
        for member_name, member in sorted(vars(module).items()):
            if member_name.startswith("_") or not (inspect.isclass(member) or inspect.isfunction(member)):
                continue
            if getattr(member, "__module__", None) == module.__name__ and inspect.getdoc(member):
                parts.append(f"{member_name}: {inspect.getdoc(member)}")
        documents.append("\n\n".join(part for part in parts if part).strip())
    return [document for document in documents if document]


DEFAULT_DOMAINS: dict[str, Callable[[], list[str]]] = {"pydoc": pydoc_documents, "docstrings": stdlib_docstrings}


class DomainWeights:
    """Sampling weights over named domains, updated as ``w ← softmax(log w + η·max(ℓ − ℓ_ref, 0))``, then mixed
    with the uniform distribution (``(1 − c)·w + c/k``), as in Sheared-LLaMA: a domain whose loss is further above
    its reference gets more of the batches.

    Raises:
        ValueError: no domain, a duplicate name, ``eta`` ≤ 0 or ``smoothing`` outside [0, 1].
    """

    def __init__(self, names: Sequence[str], eta: float = 1.0, smoothing: float = 1e-4) -> None:
        names = list(names)
        if not names or len(set(names)) != len(names):
            raise ValueError(f"`domains` must name at least one domain, each once; got {names!r}.")
        if isinstance(eta, bool) or not isinstance(eta, int | float) or eta <= 0:
            raise ValueError(f"`eta` must be a positive number, got {eta!r}.")
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) or not 0 <= smoothing <= 1:
            raise ValueError(f"`smoothing` must be in [0, 1], got {smoothing!r}.")
        self.names, self.eta, self.smoothing = names, float(eta), float(smoothing)
        self.weights = torch.full((len(names),), 1.0 / len(names), dtype=torch.float64)

    def update(self, losses: Mapping[str, float], reference: Mapping[str, float]) -> dict[str, float]:
        """New weights from each domain's current loss and reference loss; returns them by name."""
        missing = [name for name in self.names if name not in losses or name not in reference]
        if missing:
            raise ValueError(f"no loss or reference loss for domain(s) {missing}; domains: {self.names}.")
        excess = torch.tensor([max(losses[n] - reference[n], 0.0) for n in self.names], dtype=torch.float64)
        weights = torch.softmax(self.weights.log() + self.eta * excess, 0)
        self.weights = (1 - self.smoothing) * weights + self.smoothing / len(self.names)
        return self.as_dict()

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights.tolist(), strict=True))

    def load(self, weights: Mapping[str, float]) -> None:
        self.weights = torch.tensor([float(weights[name]) for name in self.names], dtype=torch.float64)


class DomainBatchSampler(Sampler[list[int]]):
    """Batches of indices into the concatenation of the domains' training windows: each window's domain is drawn by
    the current weights (read at every batch), its window uniformly from that domain. Seeded by ``(seed, epoch)``."""

    def __init__(self, sizes: Sequence[int], batch_size: int, weights: DomainWeights, seed: int = 0) -> None:
        self.sizes, self.batch_size, self.weights, self.seed, self.epoch = list(sizes), batch_size, weights, seed, 0
        self.offsets = torch.tensor([0, *self.sizes]).cumsum(0)[:-1]

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, sum(self.sizes) // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        sizes = torch.tensor(self.sizes)
        for _ in range(len(self)):
            domains = torch.multinomial(self.weights.weights, self.batch_size, replacement=True, generator=generator)
            within = (torch.rand(self.batch_size, generator=generator) * sizes[domains]).long()
            yield (self.offsets[domains] + within).tolist()


class MixedTextDataModule(SplitDataModule):
    """Text of several domains, each packed into windows and split into train/validation/test on its own; training
    batches mix the domains by :attr:`weights`, validation and test run over every domain's held-out windows.

    Args:
        domains: name → text source (see :func:`~lightning_prune.data.text.read_documents`) or a callable returning
            documents; ``None``: the offline ``"pydoc"`` and ``"docstrings"`` domains.
        tokenizer: the model's tokenizer folder (``None``: the default BPE tokenizer).
        window, batch_size, seed, num_workers: as in :class:`~lightning_prune.CausalLMDataModule`.
        val_fraction, test_fraction: each domain's shares of its windows held out (from the end of its text).
        eta, smoothing: the weights' update (see :class:`DomainWeights`).

    Raises:
        ValueError: no domain or a bad argument (at construction); in ``setup``, a domain without text or too
            short for its splits, naming the domain.
    """

    def __init__(
        self,
        domains: Mapping[str, Any] | None = None,
        tokenizer: str | Path | None = None,
        window: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        eta: float = 1.0,
        smoothing: float = 1e-4,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.domains = dict(DEFAULT_DOMAINS if domains is None else domains)
        self.weights = DomainWeights(list(self.domains), eta, smoothing)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"`window` must be an integer of at least 2 tokens, got {window!r}.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 0.5:
                raise ValueError(f"`{name}` must be a fraction in (0, 0.5), got {value!r}.")
        self.tokenizer_path, self.window, self.fractions = tokenizer, window, (val_fraction, test_fraction)
        self.tokenizer: Any = None
        self.domain_splits: dict[str, dict[str, Windows]] = {}

    def prepare_data(self) -> None:
        if self.tokenizer_path is None:
            default_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path or default_tokenizer())
        for name, source in self.domains.items():
            documents = source() if callable(source) else read_documents(source)
            if not any(document.strip() for document in documents):
                raise ValueError(f"domain {name!r} holds no text: give it a source with some.")
            self.domain_splits[name] = self._split(name, pack(documents, self.tokenizer))
        self.splits = {
            split: ConcatDataset([parts[split] for parts in self.domain_splits.values()])
            for split in ("train", "val", "test")
        }

    def _split(self, name: str, stream: Tensor) -> dict[str, Windows]:
        count = stream.numel() // self.window
        held_out = [max(1, round(fraction * count)) for fraction in self.fractions]
        if count < sum(held_out) + 1:
            raise ValueError(
                f"domain {name!r} has {stream.numel():,} tokens: {count} windows of `window`={self.window}, fewer "
                f"than the {sum(held_out) + 1} its splits need. Give it more text or use a smaller `window`."
            )
        train_end = (count - sum(held_out)) * self.window
        val_end = train_end + held_out[0] * self.window
        parts = {"train": stream[:train_end], "val": stream[train_end:val_end]}
        parts["test"] = stream[val_end : val_end + held_out[1] * self.window]
        return {split: Windows(tokens, self.window) for split, tokens in parts.items()}

    @property
    def vocabulary(self) -> int:
        self.setup()
        return len(self.tokenizer)

    def train_dataloader(self) -> DataLoader:
        sizes = [len(parts["train"]) for parts in self.domain_splits.values()]
        sampler = DomainBatchSampler(sizes, self.batch_size, self.weights, self.seed)
        return DataLoader(self.splits["train"], batch_sampler=sampler, num_workers=self.num_workers)

    def domain_windows(self, split: str = "val") -> dict[str, Tensor]:
        """Every domain's windows of ``split``, as ``(count, window)`` token ids."""
        return {name: parts[split].windows for name, parts in self.domain_splits.items()}
