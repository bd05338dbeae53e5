"""Specs for encoders that add a relative-position term to the attention scores.

- mpnet (transformers 5.24): a BERT-style post-LN layer (`attention.attn.{q,k,v,o}`,
  `attention.LayerNorm`, `intermediate`, `output`) whose scores get `position_bias`, computed once
  by `MPNetEncoder` for the padded `(L, L)` grid and handed to every layer as positional argument 2.
  It depends on i - j only, so each sequence's block among its real tokens is exactly the bias of
  that sequence alone (right or left padding): `packed` adds it per sequence (`score_bias`).
  The layer is called the older way (`output_attentions` passed, a tuple returned; the encoder
  collects hidden states in its own loop) and its attention is its own eager code.
- deberta-v2 (DeBERTa-v3 checkpoints use it) and deberta: disentangled attention (content-to-
  position and position-to-content terms from log-bucketed relative positions built for the padded
  length, i - j only) in the attention's own eager code, which applies the `(B, 1, L, L)` mask the
  encoder builds. No fused layout: the layer runs its own code on bins of whole sequences with a
  block-diagonal mask (`binned`). The encoder always collects hidden states (the model reads the
  last one), so each layer bins and unbins. A convolution after the first layer
  (`conv_kernel_size > 0`, some v2 checkpoints) stays stock.
- t5, mt5, umt5 encoders: RMSNorm without bias, unscaled scores, a bucketed relative position bias
  (i - j only) computed for the padded length by the first block (every block in umt5) and, in
  t5/mt5, handed on through the loop with the mask added. The blocks run their own code on bins
  (`binned`): the bias computed for the bins' length with the bins' block-diagonal mask added,
  returned and handed on like stock's. The decoder's blocks share the class and stay stock.
- roformer: rotary position embeddings (`sinusoidal_pos`, computed once by the encoder for the
  padded length) applied to queries and keys in the attention's own eager code: scores depend on
  i - j only, so its layers run on bins (`binned`) with the same `sinusoidal_pos`. Rotating the
  values too (`rotary_value=True`) makes outputs depend on absolute positions: such models stay stock.
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
    score_bias="position_bias",
    head_reads=TEXT_HEAD_READS,
    config_checks=(ENCODER_ONLY,),
)



def _no_conv_layer(config) -> str | None:
    size = getattr(config, "conv_kernel_size", 0) or 0
    if size > 0:
        return f"config.conv_kernel_size was {size} (a convolution over the padded frames follows the first layer)"
    return None


DEBERTA = EncoderSpec(
    name="deberta",
    model_types=("deberta-v2", "deberta"),
    layer_classes=(f"{_MODELS}.deberta_v2.modeling_deberta_v2.DebertaV2Layer",
                   f"{_MODELS}.deberta.modeling_deberta.DebertaLayer"),
    binned=True,
    layer_kwargs=("relative_pos", "rel_embeddings"),
    head_reads=TEXT_HEAD_READS,
    config_checks=(_no_conv_layer,),
)



def _encoder_block(layer) -> str | None:
    if getattr(layer, "is_decoder", False):
        return "a decoder block (causal self-attention, cross-attention) stays stock"
    return None


T5 = EncoderSpec(
    name="t5",
    model_types=("t5", "mt5"),
    layer_classes=(f"{_MODELS}.t5.modeling_t5.T5Block", f"{_MODELS}.mt5.modeling_mt5.MT5Block"),
    binned=True,
    # the shared position bias, and the decoder-only arguments (None here)
    pass_through=("position_bias", "encoder_hidden_states", "encoder_attention_mask", "encoder_decoder_position_bias"),
    conversion_checks=(_encoder_block,),
)

UMT5 = EncoderSpec(
    name="umt5",
    model_types=("umt5",),
    layer_classes=(f"{_MODELS}.umt5.modeling_umt5.UMT5Block",),
    binned=True,
    pass_through=("encoder_hidden_states",),  # None in the encoder
    conversion_checks=(_encoder_block,),
)



def _no_rotary_value(config) -> str | None:
    if getattr(config, "rotary_value", False):
        return "config.rotary_value was True (rotary values make outputs depend on absolute positions)"
    return None


ROFORMER = EncoderSpec(
    name="roformer",
    model_types=("roformer",),
    layer_classes=(f"{_MODELS}.roformer.modeling_roformer.RoFormerLayer",),
    binned=True,
    pass_through=("sinusoidal_pos",),
    head_reads=TEXT_HEAD_READS,
    config_checks=(ENCODER_ONLY, _no_rotary_value),
)


SPECS: list[EncoderSpec] = [MPNET, DEBERTA, T5, UMT5, ROFORMER]
