"""Recovery after a cut: LoRA adapters trained and merged leave a plain model of the same class; full fine-tuning."""

from __future__ import annotations

import copy

import pytest
import torch
from test_llm_pruner import llama, windows

import lightning_prune as lp
from lightning_prune.methods.llm_pruner import causal_lm_loss
from lightning_prune.methods.recovery import block_linears


def pruned_llama():
    model = llama()
    lp.llm_pruner(model, windows(), 0.5)
    return model


def test_lora_adapters_train_merge_and_leave_a_plain_model_that_reloads(tmp_path) -> None:
    from transformers import LlamaForCausalLM

    model = pruned_llama()
    keys, before = set(model.state_dict()), copy.deepcopy(model.state_dict())
    batches = list(windows(6, 16).split(2))
    result = lp.lora_recover(model, batches, causal_lm_loss, rank=4, lr=5e-3, epochs=3)
    assert (result.steps, result.tokens) == (9, 9 * 32) and result.last_loss < result.first_loss
    assert set(model.state_dict()) == keys  # merged: no adapter left behind
    assert not any("peft" in type(m).__module__ or "lora" in type(m).__name__.lower() for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all(k.rsplit(".", 2)[-2] in block_linears(model) for k in changed)  # only the adapted layers
    model.save_pretrained(tmp_path)
    ids = windows(2, 10)
    with torch.no_grad():
        reloaded = LlamaForCausalLM.from_pretrained(tmp_path).eval()
        assert torch.allclose(reloaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits, atol=1e-5)


def test_full_finetuning_lowers_the_loss_on_its_windows() -> None:
    model = pruned_llama()
    batches = list(windows(4, 16).split(2))
    result = lp.finetune(model, batches, causal_lm_loss, lr=3e-3, epochs=4)
    assert result.steps == 8 and result.last_loss < result.first_loss


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"rank": 0}, "`rank` must be a positive integer"), ({"lr": 0}, "`lr` must be a positive number"),
     ({"epochs": 0}, "`epochs` must be a positive integer"), ({"batches": []}, "`batches` is empty")],
)  # fmt: skip
def test_bad_recovery_arguments_are_named_before_anything_changes(kwargs: dict, message: str) -> None:
    model = pruned_llama()
    before = copy.deepcopy(model.state_dict())
    arguments = {"batches": list(windows(2, 8).split(1)), **kwargs}
    with pytest.raises(lp.PruningError, match=message):
        lp.lora_recover(model, arguments.pop("batches"), causal_lm_loss, **arguments)
    assert set(model.state_dict()) == set(before)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
