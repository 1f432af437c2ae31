"""Data modules: the embedded digits default, CIFAR-10 from a local folder, synthetic images, text, and text of
several domains mixed by weights."""

from lightning_prune.data.cifar10 import Cifar10DataModule
from lightning_prune.data.digits import DigitsDataModule
from lightning_prune.data.domains import MixedTextDataModule
from lightning_prune.data.splits import EpochSeededSampler, SplitDataModule
from lightning_prune.data.synthetic import SyntheticDataModule
from lightning_prune.data.text import CausalLMDataModule

__all__ = [
    "CausalLMDataModule",
    "Cifar10DataModule",
    "DigitsDataModule",
    "EpochSeededSampler",
    "MixedTextDataModule",
    "SplitDataModule",
    "SyntheticDataModule",
]
