"""Attribute updates for Hugging Face transformers layers after surgery (registered by class name).

Most of their attention code already derives sizes from tensors (``view(..., -1, head_dim)``); these
are the layers that keep a size in an attribute and use it in ``forward``.
"""

from __future__ import annotations

from torch import nn

from lightning_prune.surgery import register_layer_name


def _conv1d(module: nn.Module) -> None:
    """GPT-2's ``Conv1D`` stores its weight input-major and its output width in ``nf``."""
    module.nx, module.nf = module.weight.shape


def _gpt2_attention(module: nn.Module) -> None:
    """``split_size`` splits the fused q, k, v projection; it follows the number of heads left."""
    if getattr(module, "is_cross_attention", False):
        module.split_size = module.q_attn.nf
    else:
        module.split_size = module.c_attn.nf // 3
    module.num_heads = module.split_size // module.head_dim
    module.embed_dim = module.split_size


register_layer_name("transformers.pytorch_utils.Conv1D", _conv1d)
register_layer_name("transformers.models.gpt2.modeling_gpt2.GPT2Attention", _gpt2_attention)
