"""Synthetic images: a learnable task of any shape, generated from a seed (smoke tests, timing, sweeps)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_prune.data.splits import SplitDataModule


class SyntheticDataModule(SplitDataModule):
    """Each class is a fixed random image; every sample is its class image plus Gaussian noise.

    Args:
        num_classes: classes (one template image each).
        channels, size: image shape ``channels × size × size``.
        train_size, val_size, test_size: images per split.
        noise: standard deviation of the noise added to the templates (higher: harder).
        batch_size: training and evaluation batch size.
        seed: fixes the templates, the samples and the per-epoch shuffle.
        num_workers: DataLoader workers.
    """

    def __init__(
        self,
        num_classes: int = 10,
        channels: int = 3,
        size: int = 32,
        train_size: int = 512,
        val_size: int = 128,
        test_size: int = 128,
        noise: float = 1.0,
        batch_size: int = 64,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        for name, value in (("num_classes", num_classes), ("channels", channels), ("size", size)):
            if value < 1:
                raise ValueError(f"`{name}` must be a positive integer; got {value}.")
        for name, value in (("train_size", train_size), ("val_size", val_size), ("test_size", test_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be at least one image; got {value}.")
        self.save_hyperparameters()
        self.num_classes, self.input_shape = num_classes, (channels, size, size)
        self.sizes = {"train": train_size, "val": val_size, "test": test_size}
        self.noise = noise

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        generator = torch.Generator().manual_seed(self.seed)
        templates = torch.randn(self.num_classes, *self.input_shape, generator=generator)
        for name, count in self.sizes.items():
            labels = torch.randint(self.num_classes, (count,), generator=generator)
            images = templates[labels] + self.noise * torch.randn(count, *self.input_shape, generator=generator)
            self.splits[name] = TensorDataset(images, labels)
