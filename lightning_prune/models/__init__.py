"""Models: networks by name, the image classifier of the demo and the Hydra entry point, and a causal LM."""

from lightning_prune.models.causal_lm import DEFAULT_CONFIG, CausalLM
from lightning_prune.models.classifier import ImageClassifier
from lightning_prune.models.nets import ARCHITECTURES, DigitsCNN, build_network
from lightning_prune.models.pretrained import default_language_model

__all__ = [
    "ARCHITECTURES",
    "DEFAULT_CONFIG",
    "CausalLM",
    "DigitsCNN",
    "ImageClassifier",
    "build_network",
    "default_language_model",
]
