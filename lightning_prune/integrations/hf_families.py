"""Which config fields of each Hugging Face family follow which module widths, as data.

A pruned model saved with ``save_pretrained`` is rebuilt by ``from_pretrained`` from its config alone, so
every width a layer was built from must be written where the family's code reads it. Most decoder
families read the standard names; the table lists the exceptions by ``config.model_type``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Family:
    """Where one family's config records its widths, and what its code computes from them at build time.

    Args:
        heads, key_value_heads, hidden, ffn: the config fields holding the query head count, the key/value
            head count (None: the family has none), the residual stream width and the FFN width.
        embedding, stream: where the input embedding is narrower than the stream (OPT's ``project_in``),
            the config field of the embedding width and the module (last name) whose output is the stream.
        head_dim: the modelling code builds its attention from ``config.head_dim`` when the config has one.
            False: it computes ``hidden // heads`` itself, so a cut round-trips only while that ratio is the
            head size (heads and stream cut alike); otherwise ``from_pretrained`` builds other widths.
    """

    heads: str = "num_attention_heads"
    key_value_heads: str | None = "num_key_value_heads"
    hidden: str = "hidden_size"
    ffn: str = "intermediate_size"
    embedding: str | None = None
    stream: str | None = None
    head_dim: bool = True


FAMILIES: dict[str, Family] = {
    "gpt2": Family(heads="n_head", key_value_heads=None, hidden="n_embd", ffn="n_inner", head_dim=False),
    "opt": Family(
        key_value_heads=None, ffn="ffn_dim", embedding="word_embed_proj_dim", stream="project_in", head_dim=False
    ),
    "falcon": Family(key_value_heads="num_kv_heads", ffn="ffn_hidden_size", head_dim=False),
    "gpt_neox": Family(key_value_heads=None, head_dim=False),
    "stablelm": Family(head_dim=False),
    "bert": Family(key_value_heads=None, head_dim=False),
}
STANDARD = Family()

# Module names (the last part of the path) whose output width gives a count, and how many widths they fuse.
QUERY = {"q_proj": 1, "query": 1, "q_attn": 1, "c_attn": 3}  # GPT-2 cross-attention: q_attn, and c_attn fuses k, v
KEY = {"k_proj": 1, "key": 1}
# Projections fusing q, k and v (Phi-3's `qkv_proj`: all query heads, then the key heads, then the value heads;
# GPT-NeoX's `query_key_value`: q, k, v of each head in turn; Falcon's): the query heads are counted from the
# output projection's input, the key/value heads from what is left of the fused rows.
FUSED_HEADS = ("qkv_proj", "query_key_value")
OUTPUT = ("o_proj", "dense")
# Attention layers slicing their fused projection at bounds computed from head counts that the config sync
# keeps in step (`config.num_attention_heads`, the layer's `num_key_value_heads`).
FOLLOWING_SLICES = {
    "transformers.models.phi3.modeling_phi3.Phi3Attention": "splits `qkv_proj` at the config's head counts",
}
FEED_FORWARD = {"up_proj": 1, "fc1": 1, "c_fc": 1, "dense_h_to_4h": 1, "gate_up_proj": 2}
# Attention attributes holding the head size, set from the dense config when the model is built: the head
# size of a pruned model, whatever its config says by now.
HEAD_SIZE = ("head_dim", "head_size", "attention_head_size")

# Embeddings multiplied by ``√hidden``, a constant computed from the config when the model is built (Gemma 1-3).
# A cut stream gets the scale of its new width, the one ``from_pretrained`` computes, so that the model in memory
# and the saved one compute the same thing. It is not the dense scale: no config field can carry that one.
SCALED_EMBEDDINGS = tuple(
    f"transformers.models.{package}.modeling_{package}.{name}TextScaledWordEmbedding"
    for package, name in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3"))
)


def family(config: object) -> Family:
    """The table entry of ``config``'s family; the standard names for one not listed."""
    return FAMILIES.get(getattr(config, "model_type", ""), STANDARD)
