"""Language models end to end: text sources, a tokenizer trained offline, packed windows, the CausalLM module,
perplexity, and a pruning step inside a real Trainer on a Hugging Face Llama."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning
from lightning_prune.data.text import default_tokenizer, pack, read_documents, train_tokenizer

warnings.filterwarnings("ignore", ".*does not have many workers.*")
TINY = {
    "model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128, "tie_word_embeddings": False,
}  # fmt: skip
PROSE = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. "
    "How vexingly quick daft zebras jump! Sphinx of black quartz, judge my vow. "
)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A text file, a JSON-lines file and a tokenizer trained on them, written by the test."""
    root = tmp_path_factory.mktemp("corpus")
    text = root / "a.txt"
    text.write_text(PROSE * 40)
    lines = root / "b.jsonl"
    lines.write_text("\n".join(json.dumps({"text": f"{PROSE} Line {i}.", "id": i}) for i in range(60)) + "\n")
    tokenizer = train_tokenizer(read_documents([text, lines]), root / "tokenizer", vocabulary=300)
    return {"text": text, "lines": lines, "tokenizer": tokenizer}


def data_module(corpus: dict[str, Path], **kwargs) -> lp.CausalLMDataModule:
    options = {"files": [corpus["text"], corpus["lines"]], "tokenizer": corpus["tokenizer"], "window": 16}
    return lp.CausalLMDataModule(**{**options, **kwargs})


def test_documents_come_from_text_and_json_lines_and_datasets(corpus, tmp_path) -> None:
    import datasets

    assert read_documents(corpus["text"]) == [PROSE * 40]
    lines = read_documents(corpus["lines"])
    assert len(lines) == 60 and lines[3].endswith("Line 3.")
    table = datasets.Dataset.from_dict({"body": ["first text", "second text", " "]})
    assert read_documents(table, text_field="body") == ["first text", "second text"]
    splits = datasets.DatasetDict({"train": table, "test": table})
    assert read_documents(splits, text_field="body") == ["first text", "second text"]  # the train split only
    table.save_to_disk(tmp_path / "saved")
    assert read_documents(tmp_path / "saved", text_field="body") == ["first text", "second text"]


@pytest.mark.parametrize(
    ("content", "name", "message"),
    [
        (None, "missing.txt", r"`files` entry '.*missing.txt' does not exist"),
        ("some text", "notes.csv", r"has suffix '.csv'; expected one of .txt, .md, .rst, .jsonl"),
        ('{"text": "ok"}\nnot json\n', "broken.jsonl", r"broken.jsonl' line 2 is not JSON"),
        (
            '{"body": "no text field"}\n',
            "other.jsonl",
            r"line 1 has no string field `text_field`='text' \(it has \['body'\]\)",
        ),
        ("   \n", "empty.txt", r"empty.txt' holds no text"),
    ],
)
def test_bad_text_sources_are_named(tmp_path, content: str | None, name: str, message: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_documents(path)


def test_the_trained_tokenizer_loads_with_auto_tokenizer_and_round_trips(corpus) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(corpus["tokenizer"])
    text = "Sphinx of black quartz, judge my vow!\n  Indented: ünïcode too."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text
    assert tokenizer.eos_token == "<|endoftext|>" and len(tokenizer) == 300


def test_windows_are_packed_and_the_splits_are_disjoint_and_in_order(corpus) -> None:
    data = data_module(corpus)
    data.setup()
    stream = torch.cat([data.tokens[name] for name in ("train", "val", "test")])
    windows = torch.cat([data.splits[name].windows.reshape(-1) for name in ("train", "val", "test")])
    assert torch.equal(stream, windows)  # every window is a distinct, consecutive stretch of the stream
    assert {name: data.splits[name].windows.shape[1] for name in data.splits} == {"train": 16, "val": 16, "test": 16}
    assert len(data.splits["val"]) == len(data.splits["test"]) == round(0.05 * (stream.numel() // 16))
    full = pack(read_documents([corpus["text"], corpus["lines"]]), data.tokenizer)
    assert torch.equal(full[: stream.numel()], stream) and full.numel() - stream.numel() < 16  # only a tail is left
    assert int((full == data.tokenizer.eos_token_id).sum()) == 61  # an end-of-text token after each document
    batch = next(iter(data.train_dataloader()))
    assert batch["input_ids"].shape == (16, 16) and batch["input_ids"].dtype == torch.long


def test_calibration_windows_are_seeded_and_come_from_the_training_text(corpus) -> None:
    data = data_module(corpus)
    first, again, other = data.calibration(10, 12, seed=1), data.calibration(10, 12, seed=1), data.calibration(10, 12)
    assert first.shape == (10, 12) and torch.equal(first, again) and not torch.equal(first, other)
    train = data.tokens["train"].tolist()
    for window in first.tolist():
        assert any(train[i : i + 12] == window for i in range(len(train) - 11))


def test_calibration_that_the_training_text_cannot_give_is_refused_naming_the_files(corpus) -> None:
    data = data_module(corpus)
    data.setup()
    tokens = data.tokens["train"].numel()
    files = r"the training text of `files` \['.*a\.txt', '.*b\.jsonl'\]"
    with pytest.raises(
        ValueError, match=rf"calibration `length`={tokens + 1} is longer than {files} \({tokens:,} tokens\)"
    ):
        data.calibration(1, tokens + 1)
    assert data.calibration(2, tokens - 1).shape == (2, tokens - 1)  # the two distinct windows of that length
    with pytest.raises(
        ValueError,
        match=rf"calibration `count`=3 is more than the 2 distinct windows of `length`={tokens - 1} in {files}",
    ):
        data.calibration(3, tokens - 1)
    with pytest.raises(ValueError, match="calibration `count` must be a positive integer, got 0"):
        data.calibration(0)
    with pytest.raises(ValueError, match="calibration `length` must be an integer of at least 2 tokens, got 1"):
        data.calibration(1, 1)


def test_text_shorter_than_the_splits_need_is_refused_before_training(corpus, tmp_path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("Too short.")
    with pytest.raises(
        ValueError,
        match=r"the text of `files` \['.*short\.txt'\] has \d+ tokens: 0 windows of `window`=16, fewer than the 3 the "
        "train/validation/test splits need",
    ):
        lp.CausalLMDataModule(files=short, tokenizer=corpus["tokenizer"], window=16).setup()
    with pytest.raises(ValueError, match="`window` must be an integer of at least 2"):
        lp.CausalLMDataModule(window=1)


def test_missing_files_and_tokenizer_folders_are_refused_at_construction_naming_them(corpus, tmp_path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "file").write_text("not a folder")
    hint = r"Give the folder the tokenizer's `save_pretrained` wrote"
    cases = [
        ({"tokenizer": tmp_path / "nowhere"}, rf"`tokenizer` '.*nowhere' does not exist\. {hint}"),
        ({"tokenizer": tmp_path / "file"}, rf"`tokenizer` '.*file' is a file, not a folder\. {hint}"),
        ({"tokenizer": tmp_path / "empty"}, r"`tokenizer` '.*empty' holds no tokenizer \(no tokenizer_config\.json or"),
        ({"files": [corpus["text"], tmp_path / "gone.txt"]}, r"`files` entry '.*gone\.txt' does not exist"),
    ]
    for arguments, message in cases:
        with pytest.raises(ValueError, match=message):
            lp.CausalLMDataModule(**{"tokenizer": corpus["tokenizer"], **arguments})


def test_the_default_text_and_tokenizer_work_offline(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))
    folder = default_tokenizer(vocabulary=512)
    assert folder == tmp_path / "tokenizer-pydoc-bpe512" and (folder / "tokenizer.json").is_file()
    assert default_tokenizer(vocabulary=512) == folder  # cached: not trained again
    data = lp.CausalLMDataModule(tokenizer=folder, window=256)
    data.setup()
    assert data.vocabulary == 512 and len(data.splits["train"]) > 400


def test_the_default_tokenizer_is_written_whole_or_not_at_all(tmp_path, monkeypatch) -> None:
    from lightning_prune.data import text

    monkeypatch.setenv("LIGHTNING_PRUNE_CACHE", str(tmp_path))

    def interrupted(documents, folder: Path, vocabulary: int) -> Path:
        folder.mkdir()
        (folder / "tokenizer.json").write_text("{")  # half written
        raise KeyboardInterrupt

    monkeypatch.setattr(text, "train_tokenizer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        default_tokenizer(vocabulary=64)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the partial one is left

    def raced(documents, folder: Path, vocabulary: int) -> Path:
        folder.mkdir()
        (folder / "tokenizer.json").write_text("mine")
        final = tmp_path / "tokenizer-pydoc-bpe64"
        final.mkdir(exist_ok=True)
        (final / "tokenizer.json").write_text("theirs")  # another process finished first
        return folder

    monkeypatch.setattr(text, "train_tokenizer", raced)
    (tmp_path / "tokenizer-pydoc-bpe64").mkdir()
    (tmp_path / "tokenizer-pydoc-bpe64" / "other.txt").write_text("left by something else")
    assert default_tokenizer(vocabulary=64) == tmp_path / "tokenizer-pydoc-bpe64"
    assert (tmp_path / "tokenizer-pydoc-bpe64" / "tokenizer.json").read_text() == "theirs"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["tokenizer-pydoc-bpe64"]

    (tmp_path / "tokenizer-pydoc-bpe32").mkdir()
    (tmp_path / "tokenizer-pydoc-bpe32" / "other.txt").write_text("left by something else")

    def empty(documents, folder: Path, vocabulary: int) -> Path:
        folder.mkdir()
        return folder

    monkeypatch.setattr(text, "train_tokenizer", empty)
    with pytest.raises(
        ValueError, match=r"the tokenizer cache '.*tokenizer-pydoc-bpe32' exists without tokenizer\.json"
    ):
        default_tokenizer(vocabulary=32)
    assert not list(tmp_path.glob("*.partial-*"))


def test_a_model_and_a_tokenizer_that_do_not_belong_together_are_refused(tmp_path) -> None:
    model = lp.CausalLM(config=TINY, vocabulary=300)
    model.model.save_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="`vocabulary`: the tokenizer has 500 tokens but the model embeds only 300"):
        lp.CausalLM(pretrained=str(tmp_path / "model"), vocabulary=500)
    assert lp.CausalLM(config=TINY, vocabulary=200).model.get_input_embeddings().num_embeddings == 200
    reloaded = lp.CausalLM(pretrained=str(tmp_path / "model"), vocabulary=300)
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(reloaded.eval()(ids), model.eval()(ids))


FOLDER_HINT = r"Pass the folder `save_pretrained` wrote for the model, or `config` \(a dict\) to build a new one\."


@pytest.mark.parametrize(
    ("config_json", "arguments", "message"),
    [
        (None, {"pretrained": "nothing"}, rf"`pretrained` '.*nothing' does not exist\. {FOLDER_HINT}"),
        (None, {"pretrained": "."}, rf"`pretrained` '.*' has no config\.json: it is not a model folder\. "
         rf"{FOLDER_HINT}"),
        ("{not json", {"pretrained": "."}, r"`pretrained` '.*': its config\.json could not be read\. .*not a valid "
         r"JSON"),
        ('{"model_type": "nonsense"}', {"pretrained": "."}, r"`pretrained` '.*': its config\.json could not be read\. "
         r".*model type `nonsense`"),
        ('{"model_type": "llama"}', {"pretrained": "."}, r"`pretrained` '.*' holds no weights that load: .*no file "
         r"named model\.safetensors"),
        ('{"model_type": "llama"}', {"pretrained": ".", "config": TINY}, r"give `pretrained` or `config`, not both: "
         r"got `pretrained`='.*'"),
        (None, {"config": {"hidden_size": 32}}, r"`config` needs a `model_type` \(e\.g\. 'llama', 'qwen2', 'gpt2'\); "
         r"got \['hidden_size'\]"),
        (None, {"config": {"model_type": "nonsense"}}, "`config` has `model_type`='nonsense', which transformers does "
         "not know"),
    ],
)  # fmt: skip
def test_bad_model_folders_and_configs_are_refused_naming_them(tmp_path, config_json, arguments, message) -> None:
    if config_json is not None:
        (tmp_path / "config.json").write_text(config_json)
    if "pretrained" in arguments:
        arguments = {**arguments, "pretrained": str(tmp_path / arguments["pretrained"])}
    with pytest.raises(ValueError, match=message):
        lp.CausalLM(**arguments)


ENCODER = {
    "hidden_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "intermediate_size": 64,
    "vocab_size": 99,
}


@pytest.mark.parametrize(
    ("saved", "config", "message"),
    [
        (None, {"model_type": "t5", "d_model": 32}, r"`config` with `model_type`='t5' is a 't5' model, which has no "
         r"causal-LM head in transformers \(no …ForCausalLM class\)"),
        (None, {"model_type": "bert", **ENCODER}, r"`config` with `model_type`='bert' builds a BertLMHeadModel whose "
         r"predictions see later tokens: it is not a causal language model\. .*set `is_decoder: true`"),
        ("BertModel", None, r"`pretrained` '.*' holds a BertModel \(config\.json `architectures`\), which has no "
         r"causal-LM head: .* Save the BertLMHeadModel model, not its base"),
        ("LlamaModel", None, r"`pretrained` '.*' holds a LlamaModel \(config\.json `architectures`\), which has no "
         r"causal-LM head: .* Save the LlamaForCausalLM model"),
    ],
)  # fmt: skip
def test_a_model_that_is_not_a_causal_lm_is_refused_naming_it(tmp_path, saved, config, message) -> None:
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel

    if saved == "BertModel":
        BertModel(BertConfig(**ENCODER)).save_pretrained(tmp_path)
    elif saved == "LlamaModel":
        LlamaModel(LlamaConfig(**ENCODER, num_key_value_heads=2, tie_word_embeddings=True)).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=message):
        lp.CausalLM(pretrained=None if saved is None else str(tmp_path), config=config)


def test_an_encoder_in_its_decoder_mode_is_a_causal_lm() -> None:
    model = lp.CausalLM(config={"model_type": "bert", **ENCODER, "is_decoder": True}, example_tokens=8)
    assert type(model.model).__name__ == "BertLMHeadModel" and model(torch.arange(6)[None]).shape == (1, 6, 99)


def test_windows_the_model_cannot_read_are_refused_before_training_and_nothing_is_written(corpus, tmp_path) -> None:
    def fit(model: lp.CausalLM, **data) -> pl.Trainer:
        trainer = pl.Trainer(
            default_root_dir=tmp_path / "run", max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
            enable_progress_bar=False, enable_model_summary=False,
        )  # fmt: skip
        trainer.fit(model, data_module(corpus, batch_size=2, **data))
        return trainer

    longer = r"`window`: windows of 129 tokens are longer than the model's 128 positions \(config\.max_position_"
    with pytest.raises(ValueError, match=longer + r"embeddings\); use windows of at most 128 tokens"):
        fit(lp.CausalLM(config=TINY, vocabulary=300), window=129)
    lp.CausalLM(config=TINY, vocabulary=200).model.save_pretrained(tmp_path / "other")  # another model's tokenizer
    with pytest.raises(ValueError, match="`tokenizer`: the tokenizer has 300 tokens but the model embeds only 200"):
        fit(lp.CausalLM(pretrained=str(tmp_path / "other")))
    assert not (tmp_path / "run").exists()  # no checkpoint, no log: refused before the first step
    assert fit(lp.CausalLM(config=TINY, vocabulary=400), window=128).global_step == 1  # a larger embedding is legal
    with pytest.raises(ValueError, match="`example_tokens`: windows of 129 tokens are longer than the model's 128"):
        lp.CausalLM(config=TINY, example_tokens=129)


def test_perplexity_refuses_windows_the_model_cannot_read() -> None:
    model = lp.CausalLM(config=TINY, vocabulary=300).model
    ids = torch.zeros(2, 8, dtype=torch.long)
    with pytest.raises(ValueError, match="`windows`: windows of 129 tokens are longer than the model's 128 positions"):
        lp.perplexity(model, torch.zeros(1, 129, dtype=torch.long))
    beyond = r"embeddings \(ids 0\.\.299\): the text was tokenized for another model"
    for token in (300, -1):
        ids[1, 3] = token
        for windows in (ids, [ids[:1], ids[1:]]):  # a tensor, or batches
            with pytest.raises(
                ValueError, match=rf"`windows` holds token id {token}, outside the model's 300 {beyond}"
            ):
                lp.perplexity(model, windows)
    with pytest.raises(ValueError, match=r"`windows` must be \(count, tokens ≥ 2\) token ids, got \(8,\)"):
        lp.perplexity(model, ids[0])
    ids[1, 3] = 299
    assert math.isfinite(lp.perplexity(model, ids))


def test_perplexity_is_token_weighted_deterministic_and_what_validation_logs(corpus) -> None:
    pl.seed_everything(0, verbose=False)
    data = data_module(corpus)
    data.setup()
    model = lp.CausalLM(config=TINY, vocabulary=data.vocabulary)
    windows = data.splits["val"].windows
    value = lp.perplexity(model.model, windows, batch_size=2)
    assert value == lp.perplexity(model.model, windows, batch_size=2)  # deterministic
    assert math.isclose(value, lp.perplexity(model.model, windows, batch_size=5), rel_tol=1e-6)  # batch-independent
    assert 0.5 * data.vocabulary < value < 2 * data.vocabulary  # an untrained model is nearly uniform
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False)
    logged = trainer.validate(model, data, verbose=False)[0]
    assert math.isclose(logged["val/ppl"], value, rel_tol=1e-4)
    with pytest.raises(TypeError, match="perplexity needs a causal language model"):
        lp.perplexity(
            torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten()), torch.zeros(1, 4, dtype=torch.long)
        )


def test_structured_pruning_cuts_a_causal_lm_during_training_and_it_reloads_with_from_pretrained(
    corpus, tmp_path
) -> None:
    from transformers import AutoModelForCausalLM

    pl.seed_everything(0, verbose=False)
    data = data_module(corpus, batch_size=8)
    data.setup()
    model = lp.CausalLM(config=TINY, vocabulary=data.vocabulary, warmup_steps=2)
    pruning = StructuredPruning(0.5, "l1", schedule="oneshot", start_epoch=0, scope="local", log_table=False)
    trainer = pl.Trainer(
        max_epochs=2, limit_train_batches=4, limit_val_batches=2, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[pruning],
    )  # fmt: skip
    trainer.fit(model, data)
    config = model.model.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (2, 1, 32)
    assert config.hidden_size == 16 and pruning.done[0]["removed"] > 0
    model.model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    ids = data.splits["test"].windows[:2]
    with torch.no_grad():
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(ids), atol=1e-5)
    assert math.isfinite(trainer.callback_metrics["val/ppl"].item())


def test_generation_speed_reports_a_median_inside_its_spread_and_refuses_bad_counts() -> None:
    model = lp.CausalLM(config=TINY, vocabulary=300).model
    speed = lp.generation_speed(model, torch.randint(0, 300, (2, 5)), new_tokens=6, repeats=3, threads=1)
    assert 0 < speed["low"] <= speed["tokens_per_second"] <= speed["high"] and speed["threads"] == 1
    assert torch.get_num_threads() == 2  # the caller's thread count is restored
    with pytest.raises(ValueError, match="`new_tokens` must be a positive integer"):
        lp.generation_speed(model, torch.zeros(1, 3, dtype=torch.long), new_tokens=0)


@pytest.mark.slow
def test_the_default_language_model_is_trained_to_a_plateau_and_cached() -> None:
    """Minutes on 2 cores the first time (then cached): ``pytest -m slow``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = lp.default_language_model()
    summary = json.loads((folder / "training.json").read_text())
    assert summary["epochs"] < summary["max_epochs"]  # stopped by the plateau, not by the epoch limit
    model, tokenizer = AutoModelForCausalLM.from_pretrained(folder), AutoTokenizer.from_pretrained(folder)
    data = lp.CausalLMDataModule(tokenizer=folder, window=summary["window"])
    data.setup()
    assert math.isclose(lp.perplexity(model, data.splits["test"].windows), summary["test_ppl"], rel_tol=1e-3)
    assert summary["test_ppl"] < 0.05 * len(tokenizer)  # far below the untrained model's ~vocabulary size
