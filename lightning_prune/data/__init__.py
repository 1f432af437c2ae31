"""Data modules: the embedded digits default, and loaders for users' own data."""

from lightning_prune.data.digits import DigitsDataModule, EpochSeededSampler

__all__ = ["DigitsDataModule", "EpochSeededSampler"]
