"""Text for causal language models: local files or ``datasets`` objects, the model's tokenizer, packed windows.

Sources are read into documents, tokenized with the model's own tokenizer (``AutoTokenizer`` from a
local folder), joined with the end-of-text token and packed into windows of ``window`` tokens. The
windows are split into train/validation/test by position (disjoint by construction), and
:meth:`CausalLMDataModule.calibration` draws seeded windows from the training tokens for pruning
criteria that need activations.

The embedded default works offline on every machine: the English prose of CPython's
``pydoc_data.topics`` (79 topics, ~465k characters) and a byte-level BPE tokenizer trained on it once and
saved where ``AutoTokenizer.from_pretrained`` loads it (:func:`default_tokenizer`).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_prune.data.splits import SplitDataModule
from lightning_prune.errors import shown

TEXT_SUFFIXES = (".txt", ".md", ".rst")
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")  # save_pretrained writes both, old formats the first
DEFAULT_VOCABULARY = 2048


def cache_dir() -> Path:
    """Where trained tokenizers and models are kept: ``$LIGHTNING_PRUNE_CACHE`` or ``~/.cache/lightning_prune``."""
    return Path(os.environ.get("LIGHTNING_PRUNE_CACHE", Path.home() / ".cache" / "lightning_prune"))


def pydoc_documents() -> list[str]:
    """The prose of CPython's ``pydoc_data.topics``, one document per topic (ships with every Python)."""
    from pydoc_data.topics import topics

    return [topics[name].strip() for name in sorted(topics)]


def read_documents(source: Any, text_field: str = "text") -> list[str]:
    """Documents from a text file, a JSON-lines file, a ``datasets`` folder or object, or a list of those.

    Args:
        source: a path to a ``.txt``/``.md``/``.rst`` file (one document), a ``.jsonl`` file (one document
            per line, in ``text_field``), a folder written by ``datasets``' ``save_to_disk``, a
            ``datasets.Dataset`` or ``DatasetDict`` (its ``train`` split, or every split), or a list of them.
        text_field: the field holding the text in JSON lines and datasets.

    Raises:
        ValueError: naming the source, for a missing file, an unknown suffix, a line that is not JSON or has
            no ``text_field``, or a source without any text.
    """
    if isinstance(source, list | tuple):
        return [document for item in source for document in read_documents(item, text_field)]
    if hasattr(source, "column_names") or _is_dataset_dict(source):
        return _dataset_documents(source, text_field, repr(type(source).__name__))
    path = _existing_file(source)
    if path.is_dir():
        return _dataset_documents(_load_from_disk(path), text_field, f"'{path}'")
    if path.suffix == ".jsonl":
        return _jsonl_documents(path, text_field)
    if path.suffix not in TEXT_SUFFIXES:
        raise ValueError(
            f"`files` entry '{path}' has suffix {path.suffix!r}; expected one of "
            f"{', '.join((*TEXT_SUFFIXES, '.jsonl'))} or a folder written by datasets' save_to_disk."
        )
    text = path.read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"`files` entry '{path}' holds no text.")
    return [text]


def _existing_file(source: str | os.PathLike) -> Path:
    path = Path(os.fspath(source))
    if not path.exists():
        raise ValueError(f"`files` entry '{path}' does not exist. Give .txt or .jsonl files, or a datasets folder.")
    return path


def _jsonl_documents(path: Path, text_field: str) -> list[str]:
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"'{path}' line {number} is not JSON ({error.msg}).") from error
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise ValueError(
                f"'{path}' line {number} has no string field `text_field`={text_field!r} (it has {keys}); set "
                "`text_field` to the key that holds the text."
            )
        documents.append(record[text_field])
    if not documents:
        raise ValueError(f"'{path}' holds no JSON lines.")
    return documents


def _is_dataset_dict(source: Any) -> bool:
    return type(source).__name__ in ("DatasetDict", "IterableDatasetDict")


def _load_from_disk(path: Path) -> Any:
    try:
        from datasets import load_from_disk
    except ImportError as error:
        raise ValueError(
            f"'{path}' is a folder: reading a datasets folder needs `pip install datasets`, or pass text files."
        ) from error
    return load_from_disk(str(path))


def _dataset_documents(dataset: Any, text_field: str, where: str) -> list[str]:
    if _is_dataset_dict(dataset):
        splits = [dataset["train"]] if "train" in dataset else list(dataset.values())
        return [document for split in splits for document in _dataset_documents(split, text_field, where)]
    if text_field not in dataset.column_names:
        raise ValueError(
            f"dataset {where} has no column `text_field`={text_field!r}; its columns: {dataset.column_names}."
        )
    return [text for text in dataset[text_field] if isinstance(text, str) and text.strip()]


def train_tokenizer(documents: Iterable[str], folder: Path, vocabulary: int = DEFAULT_VOCABULARY) -> Path:
    """Train a byte-level BPE tokenizer on ``documents`` and save it where ``AutoTokenizer`` loads it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocabulary,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(documents, trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    wrapped.pad_token = wrapped.eos_token
    folder.mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(folder)
    return folder


def default_tokenizer(vocabulary: int = DEFAULT_VOCABULARY) -> Path:
    """The folder of the BPE tokenizer trained on the pydoc prose (trained once, then cached).

    It is written whole or not at all: trained into a partial folder, renamed into place, and the partial folder
    removed whatever happens, so that a reader never sees half a tokenizer.

    Raises:
        ValueError: the cache folder exists without ``tokenizer.json`` (not written here): remove it.
    """
    folder = cache_dir() / f"tokenizer-pydoc-bpe{vocabulary}"
    if (folder / "tokenizer.json").is_file():
        return folder
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    try:
        train_tokenizer(pydoc_documents(), partial, vocabulary)
        try:
            os.replace(partial, folder)
        except OSError:  # another process got there first, or something else left a folder there
            if not (folder / "tokenizer.json").is_file():
                raise ValueError(
                    f"the tokenizer cache '{folder}' exists without tokenizer.json (it was not written by "
                    "lightning-prune, or by an older version): remove it and run again."
                ) from None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return folder


def load_tokenizer(path: str | Path) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` for a local folder, with an end-of-text token.

    Raises:
        ValueError: naming the folder, when it does not exist, holds no tokenizer, or one without end-of-text.
    """
    from transformers import AutoTokenizer

    folder = _tokenizer_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError) as error:
        raise ValueError(f"`tokenizer` '{folder}' could not be loaded by AutoTokenizer: {error}") from error
    if tokenizer.eos_token_id is None:
        raise ValueError(f"the tokenizer in '{folder}' has no end-of-text token (eos_token); documents need one.")
    return tokenizer


def _tokenizer_folder(path: str | Path) -> Path:
    folder = Path(path)
    hint = "Give the folder the tokenizer's `save_pretrained` wrote (often the model's), or None for the default."
    if not folder.exists():
        raise ValueError(f"`tokenizer` '{folder}' does not exist. {hint}")
    if not folder.is_dir():
        raise ValueError(f"`tokenizer` '{folder}' is a file, not a folder. {hint}")
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ValueError(f"`tokenizer` '{folder}' holds no tokenizer (no {' or '.join(TOKENIZER_FILES)}). {hint}")
    return folder


def pack(documents: Sequence[str], tokenizer: Any) -> Tensor:
    """All documents as one stream of token ids, each followed by the end-of-text token."""
    ids: list[int] = []
    for document in documents:
        ids.extend(tokenizer(document, add_special_tokens=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


class Windows(Dataset):
    """Non-overlapping windows of ``length`` tokens of a token stream: ``{"input_ids": ...}`` per item."""

    def __init__(self, tokens: Tensor, length: int) -> None:
        count = tokens.numel() // length
        self.windows = tokens[: count * length].view(count, length)

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, Tensor]:
        return {"input_ids": self.windows[index]}


class CausalLMDataModule(SplitDataModule):
    """Packed windows of tokenized text, split by position into train/validation/test.

    Args:
        files: text sources (see :func:`read_documents`): paths, ``datasets`` objects or folders. ``None``:
            the embedded default, the prose of CPython's ``pydoc_data.topics``.
        tokenizer: the folder of the model's tokenizer (as ``save_pretrained`` writes it). ``None``: the BPE
            tokenizer trained on the default text (:func:`default_tokenizer`).
        text_field: the field holding the text in JSON lines and datasets.
        window: tokens per training and evaluation window.
        batch_size: windows per batch.
        val_fraction, test_fraction: shares of the windows held out, taken from the end of the stream.
        seed: the per-epoch shuffle of the training windows.
        num_workers: DataLoader workers.

    Raises:
        ValueError: in ``__init__``, for bad arguments, a file or tokenizer folder that does not exist, or a folder
            without a tokenizer; in ``setup``, before training, for a bad source, text shorter than the windows the
            splits need, or a tokenizer without an end-of-text token. A model checks the windows and the tokenizer
            against itself in its own ``setup`` (:class:`~lightning_prune.models.CausalLM`).
    """

    def __init__(
        self,
        files: Any = None,
        tokenizer: str | Path | None = None,
        text_field: str = "text",
        window: int = 128,
        batch_size: int = 16,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        if isinstance(window, bool) or not isinstance(window, int) or window < 2:
            raise ValueError(f"`window` must be an integer of at least 2 tokens, got {window!r}.")
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 0.5:
                raise ValueError(f"`{name}` must be a fraction in (0, 0.5), got {value!r}.")
        if tokenizer is not None:
            _tokenizer_folder(tokenizer)
        for entry in files if isinstance(files, list | tuple) else [files]:
            if isinstance(entry, str | os.PathLike):
                _existing_file(entry)
        self.save_hyperparameters(ignore=["files"] if not _plain(files) else None)
        self.files, self.tokenizer_path, self.text_field = files, tokenizer, text_field
        self.window, self.val_fraction, self.test_fraction = window, val_fraction, test_fraction
        self.tokenizer: Any = None
        self.tokens: dict[str, Tensor] = {}

    def prepare_data(self) -> None:
        if self.tokenizer_path is None:
            default_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.tokenizer = load_tokenizer(self.tokenizer_path or default_tokenizer())
        documents = pydoc_documents() if self.files is None else read_documents(self.files, self.text_field)
        stream = pack(documents, self.tokenizer)
        count = stream.numel() // self.window
        held_out = [max(1, round(fraction * count)) for fraction in (self.val_fraction, self.test_fraction)]
        if count < sum(held_out) + 1:
            raise ValueError(
                f"the text of {self._source} has {stream.numel():,} tokens: {count} windows of `window`={self.window}, "
                f"fewer than the {sum(held_out) + 1} the train/validation/test splits need. Give more text or a "
                "smaller `window`."
            )
        train_end = (count - sum(held_out)) * self.window
        val_end = train_end + held_out[0] * self.window
        self.tokens = {
            "train": stream[:train_end],
            "val": stream[train_end:val_end],
            "test": stream[val_end : val_end + held_out[1] * self.window],
        }
        self.splits = {name: Windows(tokens, self.window) for name, tokens in self.tokens.items()}

    @property
    def _source(self) -> str:
        """The text sources, as messages name them."""
        if self.files is None:
            return "the default pydoc text"
        entries = self.files if isinstance(self.files, list | tuple) else [self.files]
        return "`files` " + shown([str(entry) if _plain(entry) else type(entry).__name__ for entry in entries])

    @property
    def vocabulary(self) -> int:
        """The number of token ids the tokenizer can produce (the model's embedding rows must cover it)."""
        self.setup()
        return len(self.tokenizer)

    def calibration(self, count: int = 10, length: int | None = None, seed: int = 0) -> Tensor:
        """``count`` windows of ``length`` tokens (default ``window``) at seeded random offsets of the training text.

        LLM-Pruner's default is 10 windows of 64 tokens; SliceGPT's 128 of 2048. The windows may overlap, but
        ``count`` must not exceed the distinct windows of ``length`` the training text holds. Whether the model
        reads windows of ``length``: :func:`lightning_prune.language.check_windows`.

        Raises:
            ValueError: a ``length`` longer than the training text, or more windows than it holds.
        """
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"calibration `count` must be a positive integer, got {count!r}.")
        if length is not None and (isinstance(length, bool) or not isinstance(length, int) or length < 2):
            raise ValueError(f"calibration `length` must be an integer of at least 2 tokens, got {length!r}.")
        self.setup()
        length = self.window if length is None else length
        tokens = self.tokens["train"]
        if length > tokens.numel():
            raise ValueError(
                f"calibration `length`={length} is longer than the training text of {self._source} "
                f"({tokens.numel():,} tokens): give a `length` of at most {tokens.numel()}, or more text."
            )
        if count > tokens.numel() - length + 1:
            raise ValueError(
                f"calibration `count`={count} is more than the {tokens.numel() - length + 1:,} distinct windows of "
                f"`length`={length} in the training text of {self._source} ({tokens.numel():,} tokens): ask for "
                "fewer or shorter windows, or give more text."
            )
        generator = torch.Generator().manual_seed(seed)
        starts = torch.randint(0, tokens.numel() - length + 1, (count,), generator=generator)
        return torch.stack([tokens[start : start + length] for start in starts.tolist()])


def _plain(value: Any) -> bool:
    """Whether ``value`` is plain data that belongs in hyper-parameters (not a datasets object)."""
    if value is None or isinstance(value, str | os.PathLike):
        return True
    return isinstance(value, list | tuple) and all(isinstance(v, str | os.PathLike) for v in value)
