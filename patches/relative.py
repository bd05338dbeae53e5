"""Specs for encoders that add a relative-position term to the attention scores.

- mpnet (transformers 5.24): a BERT-style post-LN layer (`attention.attn.{q,k,v,o}`,
  `attention.LayerNorm`, `intermediate`, `output`) whose scores get `position_bias`, computed once
  by `MPNetEncoder` for the padded `(L, L)` grid and handed to every layer as positional argument 2.
  It depends on i - j only, so each sequence's block among its real tokens is exactly the bias of
  that sequence alone (right or left padding): `packed` adds it per sequence (`score_bias`).
  The layer is called the older way (`output_attentions` passed, a tuple returned; the encoder
  collects hidden states in its own loop) and its attention is its own eager code.
"""

from bt_plugin.patches.bert import ENCODER_ONLY, TEXT_HEAD_READS
from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"

MPNET = EncoderSpec(
    name="mpnet",
    model_types=("mpnet",),
    layer_classes=(f"{_MODELS}.mpnet.modeling_mpnet.MPNetLayer",),
    query="attention.attn.q", key="attention.attn.k", value="attention.attn.v", out_proj="attention.attn.o",
    norm1="attention.LayerNorm", linear1="intermediate.dense", activation="intermediate.intermediate_act_fn",
    linear2="output.dense", norm2="output.LayerNorm", num_heads="attention.attn.num_attention_heads",
    score_bias=("position_bias", 2),
    returns_tuple=True,
    head_reads=TEXT_HEAD_READS,
    config_checks=(ENCODER_ONLY,),
)

SPECS: list[EncoderSpec] = [MPNET]
