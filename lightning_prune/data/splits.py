"""What every data module here shares: train/val/test datasets and their loaders, shuffled by (seed, epoch)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class EpochSeededSampler(Sampler[int]):
    """A shuffle that depends only on ``(seed, epoch)``, so a resumed run sees the same batches as an uninterrupted one.

    Lightning calls ``set_epoch`` before every epoch.
    """

    def __init__(self, data: Sized, seed: int = 0) -> None:
        self.size, self.seed, self.epoch = len(data), seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())

    def __len__(self) -> int:
        return self.size


class SplitDataModule(pl.LightningDataModule):
    """Loaders over ``self.splits`` (``"train"``, ``"val"``, ``"test"``), filled by a subclass's ``setup``.

    Subclasses set ``num_classes`` and ``input_shape`` (channels, height, width): the Hydra entry point
    builds the model from them.
    """

    num_classes: int
    input_shape: tuple[int, int, int]

    def __init__(self, batch_size: int, seed: int, num_workers: int) -> None:
        super().__init__()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.splits: dict[str, Dataset] = {}

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        return DataLoader(
            data, self.batch_size, sampler=EpochSeededSampler(data, self.seed), num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], self.batch_size, num_workers=self.num_workers)
