"""CIFAR-10 from a local folder, read by torchvision (no download unless asked)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Subset

from lightning_prune.data.splits import SplitDataModule

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
FOLDER = "cifar-10-batches-py"  # what torchvision.datasets.CIFAR10 reads inside `root`


class Cifar10DataModule(SplitDataModule):
    """CIFAR-10 (50,000 training and 10,000 test images, 3×32×32) with the usual crop-and-flip augmentation.

    ``val_size`` images of the training set, chosen by ``seed``, are held out for validation (without
    augmentation); the test split is CIFAR-10's own.

    Args:
        root: the folder that holds ``cifar-10-batches-py/`` (the extracted python version of the dataset).
        download: let torchvision fetch the dataset into ``root`` if it is not there (off: runs stay offline).
        batch_size: training and evaluation batch size.
        val_size: training images held out for validation.
        augment: random 4-pixel-padded crops and horizontal flips of the training images.
        seed: fixes the validation split and the per-epoch shuffle.
        num_workers: DataLoader workers.

    Raises:
        FileNotFoundError: at construction, naming the folder, if ``root`` holds no ``cifar-10-batches-py/``
            and ``download`` is off.
    """

    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(
        self,
        root: str | Path = "data/cifar10",
        download: bool = False,
        batch_size: int = 128,
        val_size: int = 5000,
        augment: bool = True,
        seed: int = 0,
        num_workers: int = 4,
    ) -> None:
        super().__init__(batch_size, seed, num_workers)
        self.root = Path(root).expanduser().resolve()
        if not download and not (self.root / FOLDER).is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 not found: `root` '{self.root}' has no folder {FOLDER}/. Extract the python version of "
                "CIFAR-10 there, point `root` at the folder that holds it (data.root=/path/to/folder on the "
                "command line), or set download=true (data.download=true) to let torchvision fetch it."
            )
        if not 0 < val_size < 50_000:
            raise ValueError(f"`val_size` must be between 1 and 49,999 training images; got {val_size}.")
        self.save_hyperparameters()
        self.download, self.val_size, self.augment = download, val_size, augment

    def prepare_data(self) -> None:
        if self.download:
            from torchvision.datasets import CIFAR10

            CIFAR10(self.root, train=True, download=True)
            CIFAR10(self.root, train=False, download=True)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        from torchvision import transforms
        from torchvision.datasets import CIFAR10

        normalize = [transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        augment = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()] if self.augment else []
        train = CIFAR10(self.root, train=True, transform=transforms.Compose(augment + normalize))
        plain = CIFAR10(self.root, train=True, transform=transforms.Compose(normalize))
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(self.seed)).tolist()
        self.splits = {
            "train": Subset(train, order[self.val_size :]),
            "val": Subset(plain, order[: self.val_size]),
            "test": CIFAR10(self.root, train=False, transform=transforms.Compose(normalize)),
        }
