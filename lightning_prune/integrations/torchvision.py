"""Attribute updates for torchvision models after surgery (registered by class name)."""

from __future__ import annotations

from torch import nn

from lightning_prune.surgery import register_layer_name


def _vision_transformer(model: nn.Module) -> None:
    """``VisionTransformer`` reshapes its patch embeddings with ``hidden_dim``: it follows the stream."""
    model.hidden_dim = model.conv_proj.weight.shape[0]


register_layer_name("torchvision.models.vision_transformer.VisionTransformer", _vision_transformer)
