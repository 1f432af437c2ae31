"""An image classifier LightningModule around any network built by name."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from lightning_prune.callbacks.checkpoint import PrunableModule
from lightning_prune.models.nets import build_network

OPTIMIZERS = ("sgd", "adamw")
SCHEDULERS = ("cosine", "multistep", "none")


class ImageClassifier(PrunableModule):
    """Cross-entropy classification with accuracy metrics, SGD/AdamW and cosine or step LR schedules.

    Args:
        arch: network name (``"digits_cnn"``, ``"torchvision:resnet18"``, ...; see ``build_network``).
        num_classes, in_channels, input_size: data shape, also used for ``example_input_array``.
        lr, momentum, weight_decay, optimizer: the optimizer (``"sgd"`` with momentum, or ``"adamw"``).
        scheduler: ``"cosine"`` over ``max_epochs``, ``"multistep"`` (×``gamma`` at ``milestones``, given as
            fractions of ``max_epochs``, e.g. the Network Slimming recipe's ``[0.5, 0.75]``) or ``"none"``.
        arch_kwargs: passed to the network constructor (e.g. ``{"channels": [16, 32, 64]}``).
    """

    def __init__(
        self,
        arch: str = "digits_cnn",
        num_classes: int = 10,
        in_channels: int = 1,
        input_size: int = 8,
        lr: float = 0.05,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        optimizer: str = "sgd",
        scheduler: str = "cosine",
        milestones: Sequence[float] = (0.5, 0.75),
        gamma: float = 0.1,
        arch_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"`optimizer` must be one of {', '.join(OPTIMIZERS)}; got {optimizer!r}.")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {', '.join(SCHEDULERS)}; got {scheduler!r}.")
        self.save_hyperparameters()
        self.net = build_network(arch, num_classes, in_channels, **(arch_kwargs or {}))
        self.example_input_array = torch.zeros(8, in_channels, input_size, input_size)
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.val_accuracy(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val/acc", self.val_accuracy, prog_bar=True)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.test_accuracy(self(x), y)
        self.log("test/acc", self.test_accuracy)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(self.parameters(), hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        else:
            optimizer = torch.optim.AdamW(self.parameters(), hp.lr, weight_decay=hp.weight_decay)
        if hp.scheduler == "none":
            return {"optimizer": optimizer}
        epochs = max(int(self.trainer.max_epochs or 1), 1)
        if hp.scheduler == "cosine":
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            steps = [max(1, round(m * epochs)) for m in hp.milestones]
            scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, steps, gamma=hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
