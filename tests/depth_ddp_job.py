"""Depth pruning under DDP, for tests/test_depth_methods.py: two CPU ranks (gloo) drop a block of a tiny Llama at
the start of fit, scoring it on calibration batches. Each rank writes ROOT/rank{r}.pt: the batches the method
scored on, its record and its final state dict.

    python tests/depth_ddp_job.py ROOT IMPORTANCE
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from test_llm_callbacks import CONFIG, loader, trainer

import lightning_prune as lp
from lightning_prune.callbacks import StructuredPruning


def main(root: Path, importance: str) -> None:
    warnings.filterwarnings("ignore")
    pl.seed_everything(0, verbose=False)
    module = lp.CausalLM(config=CONFIG, vocabulary=64, warmup_steps=1)
    pruning = StructuredPruning(
        0.34, importance, structure="layers", when="train_epoch_start", calibration_batches=2, log_table=False
    )
    seen: list = []
    step = pruning.method.step

    def observed(*args, statistics=None, **options):  # what the method scored on, as it received it
        seen.extend(statistics["batches"])
        return step(*args, statistics=statistics, **options)

    pruning.method.step = observed
    fit = trainer(1, [pruning], enable_checkpointing=False, strategy="ddp", accelerator="cpu", devices=2)
    fit.fit(module, loader())
    state = {"batches": seen, "record": lp.applied_record(module), "state_dict": module.state_dict()}
    torch.save(state, root / f"rank{fit.global_rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
