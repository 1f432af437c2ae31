"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline)."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset


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


class DigitsDataModule(pl.LightningDataModule):
    """``sklearn.datasets.load_digits`` as 1×8×8 tensors with a fixed, stratified train/val/test split.

    Args:
        batch_size: training and evaluation batch size.
        val_fraction, test_fraction: shares of the 1,797 images held out (stratified by class).
        seed: fixes the split and the per-epoch shuffle.
        num_workers: DataLoader workers.
    """

    num_classes = 10
    input_shape = (1, 8, 8)

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.2,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` ({val_fraction}) and `test_fraction` ({test_fraction}) must be in (0, 1) "
                "and leave images for training."
            )
        self.save_hyperparameters()
        self.batch_size, self.seed, self.num_workers = batch_size, seed, num_workers
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.splits: dict[str, TensorDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        indices = list(range(len(labels)))
        rest, test = train_test_split(indices, test_size=self.test_fraction, stratify=labels, random_state=self.seed)
        train, val = train_test_split(
            rest,
            test_size=self.val_fraction / (1 - self.test_fraction),
            stratify=labels[rest],
            random_state=self.seed,
        )
        x = torch.tensor(images, dtype=torch.float32).view(-1, *self.input_shape) / 16.0
        y = torch.tensor(labels, dtype=torch.long)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        self.splits = {
            name: TensorDataset(x[part], y[part]) for name, part in (("train", train), ("val", val), ("test", test))
        }

    def train_dataloader(self) -> DataLoader:
        data = self.splits["train"]
        return DataLoader(
            data, self.batch_size, sampler=EpochSeededSampler(data, self.seed), num_workers=self.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["val"], self.batch_size, num_workers=self.num_workers)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.splits["test"], self.batch_size, num_workers=self.num_workers)
