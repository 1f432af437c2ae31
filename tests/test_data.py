"""The data modules: shapes, splits and seeds of the synthetic images; CIFAR-10's errors before any data is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightning_prune.data import Cifar10DataModule, SyntheticDataModule


def test_synthetic_images_have_the_asked_shape_and_depend_only_on_the_seed() -> None:
    data = SyntheticDataModule(num_classes=4, channels=2, size=6, train_size=20, val_size=8, test_size=12, batch_size=5)
    data.setup()
    assert data.num_classes == 4 and data.input_shape == (2, 6, 6)
    assert {name: len(split) for name, split in data.splits.items()} == {"train": 20, "val": 8, "test": 12}
    images, labels = next(iter(data.test_dataloader()))
    assert images.shape == (5, 2, 6, 6) and labels.max() < 4
    again, other = SyntheticDataModule(4, 2, 6, 20, 8, 12, seed=0), SyntheticDataModule(4, 2, 6, 20, 8, 12, seed=1)
    again.setup()
    other.setup()
    assert torch.equal(again.splits["train"].tensors[0], data.splits["train"].tensors[0])
    assert not torch.equal(other.splits["train"].tensors[0], data.splits["train"].tensors[0])


def test_synthetic_classes_are_separable_at_low_noise() -> None:
    data = SyntheticDataModule(noise=0.1, size=8)
    data.setup()
    images, labels = data.splits["train"].tensors
    centres = torch.stack([images[labels == c].mean(0) for c in range(10)]).flatten(1)
    nearest = torch.cdist(images.flatten(1), centres).argmin(1)
    assert (nearest == labels).float().mean() == 1.0


@pytest.mark.parametrize(("argument", "value"), [("num_classes", 0), ("size", 0), ("train_size", 0)])
def test_synthetic_bad_sizes_are_named(argument: str, value: int) -> None:
    with pytest.raises(ValueError, match=f"`{argument}` must be"):
        SyntheticDataModule(**{argument: value})


def test_cifar10_missing_folder_fails_at_construction_naming_it(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=f"'{tmp_path / 'nowhere'}' has no folder cifar-10-batches-py/"):
        Cifar10DataModule(root=tmp_path / "nowhere")


def test_cifar10_without_the_dataset_files_fails_in_setup_before_training(tmp_path: Path) -> None:
    (tmp_path / "cifar-10-batches-py").mkdir()
    data = Cifar10DataModule(root=tmp_path, num_workers=0)
    assert data.num_classes == 10 and data.input_shape == (3, 32, 32)
    with pytest.raises(RuntimeError, match="not found or corrupted"):  # torchvision checks every file's md5
        data.setup()
