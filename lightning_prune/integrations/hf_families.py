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
            head count (None: the family has none), the residual stream width and the FFN width (None: the
            code derives it, BLOOM's ``4 * hidden``).
        embedding, stream: where the input embedding is narrower than the stream (OPT's ``project_in``),
            the config field of the embedding width and the module (last name) whose output is the stream.
        head_dim: the modelling code builds its attention from the config field ``head_size`` when the config
            has one. False: it computes ``hidden // heads`` itself, so a cut round-trips only while that ratio
            is the head size (heads and stream cut alike); otherwise ``from_pretrained`` builds other widths.
        key_value_mirror: a config field the config derives from ``key_value_heads`` when it is built, kept in
            step where the config has one (Falcon's ``num_key_value_heads`` since transformers 5.25: the key/value
            heads its layers produce, 1 for multi-query), so the config in memory says what a reload computes.
        sections: ``(class name part, heads field, ffn field)`` for models whose encoder and decoder have widths
            of their own (BART's ``encoder_attention_heads``, ``decoder_ffn_dim``): a layer inside a module whose
            class name contains the part (``BartDecoderLayer``, or the ``BartDecoder`` being synced) uses them.
        follow_hidden: config fields that are the stream width too where the dense config has them equal to it
            (DeBERTa-v2's ``pooler_hidden_size``); a field set to another width keeps it.
    """

    heads: str = "num_attention_heads"
    key_value_heads: str | None = "num_key_value_heads"
    hidden: str = "hidden_size"
    ffn: str | None = "intermediate_size"
    embedding: str | None = None
    stream: str | None = None
    head_dim: bool = True
    head_size: str = "head_dim"
    key_value_mirror: str | None = None
    sections: tuple[tuple[str, str, str], ...] = ()
    follow_hidden: tuple[str, ...] = ()

    def fields(self, classes: list[str]) -> tuple[str, str | None]:
        """The heads field and the FFN field of a layer inside modules of ``classes`` (innermost first)."""
        for name in classes:
            for part, heads, ffn in self.sections:
                if part in name:
                    return heads, ffn
        return self.heads, self.ffn

    @property
    def head_fields(self) -> set[str]:
        return {self.heads} | {heads for _, heads, _ in self.sections}


BERT = Family(key_value_heads=None, head_dim=False)
FAMILIES: dict[str, Family] = {
    "gpt2": Family(heads="n_head", key_value_heads=None, hidden="n_embd", ffn="n_inner", head_dim=False),
    "opt": Family(
        key_value_heads=None, ffn="ffn_dim", embedding="word_embed_proj_dim", stream="project_in", head_dim=False
    ),
    "falcon": Family(
        key_value_heads="num_kv_heads", ffn="ffn_hidden_size", head_dim=False, key_value_mirror="num_key_value_heads"
    ),
    "gpt_neox": Family(key_value_heads=None, head_dim=False),
    "stablelm": Family(head_dim=False),
    "bert": BERT,
    "electra": Family(key_value_heads=None, embedding="embedding_size", stream="embeddings_project", head_dim=False),
    "albert": Family(
        key_value_heads=None, embedding="embedding_size", stream="embedding_hidden_mapping_in", head_dim=False
    ),
    "distilbert": Family(heads="n_heads", key_value_heads=None, hidden="dim", ffn="hidden_dim", head_dim=False),
    "deberta-v2": Family(
        key_value_heads=None,
        head_size="attention_head_size",
        embedding="embedding_size",
        stream="embed_proj",
        follow_hidden=("pooler_hidden_size",),
    ),
    "bloom": Family(heads="n_head", key_value_heads=None, ffn=None, head_dim=False),
    "t5": Family(heads="num_heads", key_value_heads=None, hidden="d_model", ffn="d_ff", head_size="d_kv"),
    "bart": Family(
        heads="encoder_attention_heads",
        key_value_heads=None,
        hidden="d_model",
        ffn="encoder_ffn_dim",
        head_dim=False,
        sections=(
            ("Decoder", "decoder_attention_heads", "decoder_ffn_dim"),
            ("Encoder", "encoder_attention_heads", "encoder_ffn_dim"),
        ),
    ),
}
STANDARD = Family()

# Module names (the last part of the path) whose output width gives a count, and how many widths they fuse.
QUERY = {"q_proj": 1, "query": 1, "query_proj": 1, "q_lin": 1, "q": 1, "q_attn": 1, "c_attn": 3}  # GPT-2 cross-
KEY = {"k_proj": 1, "key": 1, "key_proj": 1, "k_lin": 1, "k": 1}  # attention: q_attn, and its c_attn fuses k and v
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
FEED_FORWARD = {
    "up_proj": 1, "fc1": 1, "c_fc": 1, "dense_h_to_4h": 1, "gate_up_proj": 2, "ffn": 1, "lin1": 1, "wi": 1, "wi_0": 1
}  # fmt: skip
# Attention attributes holding the head size, set from the dense config when the model is built: the head
# size of a pruned model, whatever its config says by now.
HEAD_SIZE = ("head_dim", "head_size", "attention_head_size", "key_value_proj_dim")

# Embeddings multiplied by ``√hidden``, a constant computed from the config when the model is built (Gemma 1-3).
# A cut stream gets the scale of its new width, the one ``from_pretrained`` computes, so that the model in memory
# and the saved one compute the same thing. It is not the dense scale: no config field can carry that one.
SCALED_EMBEDDINGS = tuple(
    f"transformers.models.{package}.modeling_{package}.{name}TextScaledWordEmbedding"
    for package, name in (("gemma", "Gemma"), ("gemma2", "Gemma2"), ("gemma3", "Gemma3"))
)


# The buffer of an attention layer holding the indices of the dense heads it kept, whose ALiBi slopes it reads
# (BLOOM): saved with the weights once heads are gone. No config builds it: the config keeps the dense head count.
ALIBI_HEADS = "alibi_heads"


def family(config: object) -> Family:
    """The table entry of ``config``'s family; the standard names for one not listed."""
    return FAMILIES.get(getattr(config, "model_type", ""), STANDARD)
