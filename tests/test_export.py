"""Pruned models leave as ONNX files and ``torch.export`` programs that compute what the eager model computes
(checked in ONNX Runtime, other batch sizes and sequence lengths included), are timed like eager models, and
refuse what the exporters cannot express without leaving a file behind."""

from __future__ import annotations

import pytest
import torch
from nets import ResidualNet

import lightning_prune as lp
from lightning_prune.errors import PruningError

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def pruned_cnn() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, images = ResidualNet().eval(), torch.randn(4, 3, 16, 16)
    result = lp.prune(model, images, 0.5, "l1")
    assert result.params_after < result.params_before
    return model, images


def test_a_pruned_cnn_exports_to_onnx_and_runs_in_onnx_runtime_with_its_outputs_at_any_batch(tmp_path) -> None:
    model, images = pruned_cnn()
    path = tmp_path / "cnn.onnx"
    check = lp.export_onnx(
        model, images, path, exporter="torchscript", dynamic_dims={0: "batch"}, check_inputs=[torch.randn(7, 3, 16, 16)]
    )
    assert check.path == path and path.exists() and check.max_abs_error <= 1e-4 + 1e-4 * check.max_abs_output
    assert [file.name for file in tmp_path.iterdir()] == ["cnn.onnx"]  # nothing partial left beside it
    onnx_model = lp.OnnxModule(path, threads=1)
    other = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(other), model(other), atol=1e-4, rtol=1e-4)
    timing = lp.compare_latency(model, onnx_model, images, repeats=3, min_run_time=0.05)
    assert timing.dense.median > 0 and timing.pruned.median > 0


def test_an_onnx_file_that_computes_something_else_is_not_kept(tmp_path) -> None:
    model, images = pruned_cnn()
    path = tmp_path / "cnn.onnx"
    path.write_bytes(b"earlier")

    class Noisy(torch.nn.Module):  # an output that no exported graph can reproduce: fresh noise at every call
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x) + torch.rand(()).item()

    with pytest.raises(PruningError, match=r"ONNX Runtime differs from the eager model in output 0"):
        lp.export_onnx(Noisy(), images, path, exporter="torchscript")
    assert path.read_bytes() == b"earlier" and [file.name for file in tmp_path.iterdir()] == ["cnn.onnx"]


def test_an_op_onnx_cannot_express_is_named_and_leaves_no_file(tmp_path) -> None:
    class Differences(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.diff(x, dim=-1)

    with pytest.raises(PruningError, match=r"cannot export Differences to ONNX with the 'torchscript'.*aten::diff"):
        lp.export_onnx(Differences(), torch.randn(2, 5), tmp_path / "d.onnx", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_bad_export_arguments_are_refused_by_name(tmp_path) -> None:
    model, images = pruned_cnn()
    with pytest.raises(PruningError, match=r"`exporter` must be one of \('dynamo', 'torchscript'\), got 'tflite'"):
        lp.export_onnx(model, images, tmp_path / "m.onnx", exporter="tflite")
    with pytest.raises(PruningError, match=r"`dynamic_dims` names dimension 4, but input 'input_0' has 4 dimensions"):
        lp.export_onnx(model, images, tmp_path / "m.onnx", dynamic_dims={4: "x"})
    with pytest.raises(PruningError, match=r"^cannot export a model whose output is dict: export needs a tensor"):
        lp.export_program(_Named(), images)
    for exporter in ("torchscript", "dynamo"):  # the output is the problem, not the exporter: no other one suggested
        with pytest.raises(PruningError, match=r"^cannot export a model whose output is dict") as raised:
            lp.export_onnx(_Named(), images, tmp_path / "n.onnx", exporter=exporter)
        assert "try exporter" not in str(raised.value)
    assert list(tmp_path.iterdir()) == []


class _Named(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"features": x}


def tiny_llama() -> tuple[torch.nn.Module, dict]:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    lp.llm_pruner(model, ids, 0.3, variant="vectorwise")
    return model, {"input_ids": ids, "use_cache": False}


def test_a_pruned_language_model_exports_with_torch_export_for_any_batch_and_length() -> None:
    model, inputs = tiny_llama()
    longer = {"input_ids": torch.randint(0, 64, (3, 20)), "use_cache": False}
    program = lp.export_program(model, inputs, dynamic_dims={0: "batch", 1: "sequence"}, check_inputs=[longer])
    with torch.no_grad():
        torch.testing.assert_close(program.module()(longer["input_ids"]), model(**longer).logits)


@pytest.mark.slow  # the dynamo exporter takes 15-40 s on a 2-layer model
def test_a_pruned_language_model_exports_to_onnx_and_computes_its_logits(tmp_path) -> None:
    model, inputs = tiny_llama()
    longer = {"input_ids": torch.randint(0, 64, (3, 20)), "use_cache": False}
    path = tmp_path / "llama.onnx"
    check = lp.export_onnx(model, inputs, path, dynamic_dims={0: "batch", 1: "sequence"}, check_inputs=[longer])
    assert check.max_abs_error < 1e-4
    assert sorted(file.name for file in tmp_path.iterdir()) == ["llama.onnx", "llama.onnx.data"]
    onnx_model = lp.OnnxModule(path)
    with torch.no_grad():
        torch.testing.assert_close(onnx_model(**longer), model(**longer).logits, atol=1e-4, rtol=1e-4)
