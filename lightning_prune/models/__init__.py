"""Models: networks by name and the classifier LightningModule used by the demo and the Hydra entry point."""

from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.nets import ARCHITECTURES, DigitsCNN, build_network

__all__ = ["ARCHITECTURES", "DigitsCNN", "ImageClassifier", "build_network"]
