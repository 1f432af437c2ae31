"""The embedded default dataset: scikit-learn's bundled 8x8 handwritten digits (1,797 images, offline)."""

from __future__ import annotations

import torch
from torch.utils.data import TensorDataset

from lightning_prune.data.splits import SplitDataModule


class DigitsDataModule(SplitDataModule):
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
        super().__init__(batch_size, seed, num_workers)
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` ({val_fraction}) and `test_fraction` ({test_fraction}) must be in (0, 1) "
                "and leave images for training."
            )
        self.save_hyperparameters()
        self.val_fraction, self.test_fraction = val_fraction, test_fraction

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
