"""Specs for rotary, gated and RMSNorm encoders: their layers run their own code on packed tokens.

Read in transformers 5.24: each layer computes attention through transformers' attention
interface (`attention_interface=True`), takes the attention mask as argument 1 and the rotary
`(cos, sin)` computed once by the model as `position_embeddings`, returns a tensor. No fused
layout is declared: the `layercode` path runs the layer as it is (gated MLPs, RMSNorm, bias-free
norms, grouped-query heads, whatever linears the user put in), attention per sequence over its
real tokens with the mask stock applies among them (ModernBERT's sliding-window layers included:
each layer's own mask is restricted to each sequence's real tokens).

- modernbert: layer loop in `ModernBertModel.forward` (a PreTrainedModel: the frame is opened by
  a forward hook), alternating global and local (sliding-window) layers, per-layer-type rotary.
- gte, nomic_bert, jina_embeddings_v3: post-LN BERT-like layers with a gated MLP.
- eurobert: pre-RMSNorm, grouped-query attention; `position_ids` also reach the layer.
- esm: pre-LN BERT-like layers, rotary (ESM-2) or absolute positions (ESM-1b); `is_decoder` /
  `add_cross_attention` configurations stay stock.
- Versions (read off every release's layer signature): ModernBERT's layers took a separate
  `sliding_window_mask`, `cu_seqlens` and computed rotary inside attention before 5.1; ESM's
  attention applied rotary itself (on packed positions that would be wrong) before 5.6. Those
  specs are limited to the versions they describe (`transformers=`): before, the registry skips
  them with a reason and the models stay stock. GTE, NomicBERT, Jina v3 and EuroBERT arrived
  (5.3 - 5.18) with today's convention.
- roformer: its self-attention is its own eager code (no attention interface), so it is served by
  `binned` instead (patches/relative.py).
"""

from bt_plugin.patches.bert import ENCODER_ONLY, TEXT_HEAD_READS
from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"
_ROTARY = dict(attention_interface=True, layer_kwargs=("position_embeddings",), head_reads=TEXT_HEAD_READS)

SPECS: list[EncoderSpec] = [
    EncoderSpec(name="modernbert", model_types=("modernbert",),
                layer_classes=(f"{_MODELS}.modernbert.modeling_modernbert.ModernBertEncoderLayer",),
                transformers=">=5.1", **_ROTARY),
    EncoderSpec(name="gte", model_types=("gte",),
                layer_classes=(f"{_MODELS}.gte.modeling_gte.GteLayer",), **_ROTARY),
    EncoderSpec(name="nomic_bert", model_types=("nomic_bert",),
                layer_classes=(f"{_MODELS}.nomic_bert.modeling_nomic_bert.NomicBertLayer",), **_ROTARY),
    EncoderSpec(name="jina_embeddings_v3", model_types=("jina_embeddings_v3",),
                layer_classes=(f"{_MODELS}.jina_embeddings_v3.modeling_jina_embeddings_v3.JinaEmbeddingsV3Layer",),
                **_ROTARY),
    EncoderSpec(name="eurobert", model_types=("eurobert",),
                layer_classes=(f"{_MODELS}.eurobert.modeling_eurobert.EuroBertDecoderLayer",),
                **{**_ROTARY, "layer_kwargs": ("position_embeddings", "position_ids")}),
    EncoderSpec(name="esm", model_types=("esm",),
                layer_classes=(f"{_MODELS}.esm.modeling_esm.EsmLayer",),
                config_checks=(ENCODER_ONLY,), transformers=">=5.6", **_ROTARY),
]
