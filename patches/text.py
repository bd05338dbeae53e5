"""Specs for the text encoder families whose layer is a BERT-style or DistilBERT-style block.

Each spec names the layer classes and, relative to one encoder layer, where the pieces of
post-layer-norm (or pre-layer-norm) self-attention + feed-forward live. Every layer listed here
was read in transformers 5.24: standard scaled-dot-product scores (`head_dim ** -0.5`), no
relative position bias, no rotary embedding, no gating, an `nn.Module` activation, the attention
mask as argument 1 (positional or keyword). Most return a tensor and have their outputs recorded
by transformers' hooks; the older BERT copies (tapas, rembert, visual_bert, megatron-bert) pass
`output_attentions` to the layer, gather hidden states in the encoder's own loop and get a tuple
back from the layer (observed from the layer itself, `bt_plugin.dispatch.calls`): a call with
`output_attentions=True` runs the stock forward (the core's call check), and while the encoder
collects outputs nothing stays packed.

Examined and left stock:
- flava_text_model, canine: legacy layer call (`output_attentions` passed to the layer, hidden
  states collected by the encoder's own loop, a tuple returned); not examined further yet.
- big_bird: block-sparse attention by default, switched per call (band/from/to masks).
- layoutlmv2, layoutlmv3: relative 1-D and 2-D position bias added to the scores.
- esm: rotary embeddings (ESM-2): served by patches/rotary.py (layer code on packed tokens).
- ibert: integer-only quantized modules (QuantLinear, IntLayerNorm, IntGELU).
- xmod: per-language adapters inside each layer.
- lilt, bros, luke: layout / bbox / entity streams inside the attention.
- roformer, funnel: rotary or relative positions in the attention (mpnet, deberta, deberta-v2:
  patches/relative.py).
- convbert, mobilebert, squeezebert, longformer, nystromformer, yoso, mra: not a plain
  self-attention + FFN block (convolutions, bottlenecks, windowed or approximate attention).
- nomic_bert, gte, eurobert, modernbert, jina_embeddings_v3: rotary embeddings and gated MLPs,
  served by patches/rotary.py (layer code on packed tokens); ultrabert: not examined yet.
- xlm, flaubert: attention, norms and FFNs kept in parallel ModuleLists (no layer module).
- bridgetower_text_model: BERT-style layer, but not a public standalone class (BridgeTowerModel
  drives its text layers itself, interleaved with cross-modal layers).
"""

from bt_plugin.patches.bert import BERT_LAYER_PATHS, ENCODER_ONLY, TEXT_HEAD_READS
from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"
# The specs with `attention_interface=True` compute attention through transformers' attention
# interface: a layer whose projections were replaced (adapters) runs its own code padding-free.
# The older copies (tapas, rembert, visual_bert, megatron-bert) have their own eager attention.

# BERT's own layer layout (`attention.self.{query,key,value}`, `attention.output.{dense,LayerNorm}`,
# `intermediate.{dense,intermediate_act_fn}`, `output.{dense,LayerNorm}`), post-layer-norm, copied
# into these families (the text towers of ALIGN, AltCLIP, Chinese-CLIP and CLAP loaded as their
# own model types). bert-generation and dpr (a BertModel inside) honour `is_decoder` /
# `add_cross_attention` (causal self-attention, cross-attention): such configurations stay stock
# with the reason. The other copies ignore both flags, so for them the check never matters.
BERT_LAYOUT = EncoderSpec(
    name="bert_layout",
    model_types=(
        "bert-generation", "dpr", "splinter", "layoutlm", "markuplm",
        "align_text_model", "altclip_text_model", "chinese_clip_text_model", "clap_text_model",
    ),
    layer_classes=(
        f"{_MODELS}.bert_generation.modeling_bert_generation.BertGenerationLayer",
        f"{_MODELS}.bert.modeling_bert.BertLayer",  # dpr: DPR*Encoder / DPRReader wrap a BertModel
        f"{_MODELS}.splinter.modeling_splinter.SplinterLayer",
        f"{_MODELS}.layoutlm.modeling_layoutlm.LayoutLMLayer",
        f"{_MODELS}.markuplm.modeling_markuplm.MarkupLMLayer",
        f"{_MODELS}.align.modeling_align.AlignTextLayer",
        f"{_MODELS}.altclip.modeling_altclip.AltRobertaLayer",
        f"{_MODELS}.chinese_clip.modeling_chinese_clip.ChineseCLIPTextLayer",
        f"{_MODELS}.clap.modeling_clap.ClapTextLayer",
    ),
    **BERT_LAYER_PATHS,
    # DPR's encoders embed the first token; its reader scores spans over every position.
    # AltCLIP's text tower has no pooler module: its pooled output is the first position, projected.
    head_reads=(("DPRReader", "every"), ("DPRContextEncoder", "first"), ("DPRQuestionEncoder", "first"),
                ("AltCLIPTextModel", "first"), *TEXT_HEAD_READS),
    config_checks=(ENCODER_ONLY,),
    attention_interface=">=5.0",
)

# DistilBERT's TransformerBlock: post-layer-norm, attention projections named q/k/v/out_lin.
DISTILBERT = EncoderSpec(
    name="distilbert",
    model_types=("distilbert",),
    layer_classes=(f"{_MODELS}.distilbert.modeling_distilbert.TransformerBlock",),
    query="attention.q_lin",
    key="attention.k_lin",
    value="attention.v_lin",
    out_proj="attention.out_lin",
    norm1="sa_layer_norm",
    linear1="ffn.lin1",
    activation="ffn.activation",
    linear2="ffn.lin2",
    norm2="output_layer_norm",
    num_heads="attention.n_heads",
    head_reads=TEXT_HEAD_READS,
    attention_interface=">=5.0",
)

# ALBERT: one AlbertLayer per layer group (by default one group, one layer), called
# `num_hidden_layers` times by AlbertTransformer. Post-layer-norm; default activation gelu_new
# (the tanh approximation), which the packed kernel computes exactly and fastpath does not.
ALBERT = EncoderSpec(
    name="albert",
    model_types=("albert",),
    layer_classes=(f"{_MODELS}.albert.modeling_albert.AlbertLayer",),
    query="attention.query",
    key="attention.key",
    value="attention.value",
    out_proj="attention.dense",
    norm1="attention.LayerNorm",
    linear1="ffn",
    activation="activation",
    linear2="ffn_output",
    norm2="full_layer_layer_norm",
    num_heads="attention.num_attention_heads",
    head_reads=TEXT_HEAD_READS,
    attention_interface=">=5.0",
)

# XLM-RoBERTa-XL: pre-layer-norm (the encoder applies a final LayerNorm after the stack).
XLM_ROBERTA_XL = EncoderSpec(
    name="xlm_roberta_xl",
    model_types=("xlm-roberta-xl",),
    layer_classes=(f"{_MODELS}.xlm_roberta_xl.modeling_xlm_roberta_xl.XLMRobertaXLLayer",),
    **{**BERT_LAYER_PATHS, "norm1": "attention.self_attn_layer_norm", "norm2": "LayerNorm"},
    norm_first=True,
    config_checks=(ENCODER_ONLY,),
    head_reads=TEXT_HEAD_READS,
    attention_interface=">=5.0",
)

# RoBERTa-PreLayerNorm: pre-layer-norm, the norms live in the attention and intermediate blocks.
ROBERTA_PRELAYERNORM = EncoderSpec(
    name="roberta_prelayernorm",
    model_types=("roberta-prelayernorm",),
    layer_classes=(f"{_MODELS}.roberta_prelayernorm.modeling_roberta_prelayernorm.RobertaPreLayerNormLayer",),
    **{**BERT_LAYER_PATHS, "norm1": "attention.LayerNorm", "norm2": "intermediate.LayerNorm"},
    norm_first=True,
    config_checks=(ENCODER_ONLY,),
    head_reads=TEXT_HEAD_READS,
    attention_interface=">=5.0",
)

# BERT's layer layout again, post-layer-norm, in the older call convention: the encoder passes
# the mask (eager additive; visual_bert's is (B, 1, 1, K)) and `output_attentions` to the layer
# and the layer returns a tuple (rembert's always carries the attention probabilities as well).
# - tapas: TapasModel ignores `is_decoder` for its mask, but its layer honours `is_decoder` /
#   `add_cross_attention`, so those configurations stay stock. Seven token-type embeddings and
#   the per-cell position reset only change the embeddings.
# - rembert: the encoder maps the `input_embedding_size` embeddings to `hidden_size` with
#   `embedding_hidden_mapping_in` before the layer loop; the layers themselves are BERT's.
#   `is_decoder` gives a causal mask and a decoder layer: stays stock.
# - visual_bert: visual embeddings are concatenated to the text in the embeddings, the layers
#   see one sequence. Its config has no decoder flags (the layer has no cross-attention); with
#   `bypass_transformer` the extra `additional_layer` is not in a layer list and stays stock
#   (that path fails in stock transformers 5.24 as soon as visual embeddings are given).
BERT_LEGACY = EncoderSpec(
    name="bert_legacy",
    model_types=("tapas", "rembert", "visual_bert"),
    layer_classes=(
        f"{_MODELS}.tapas.modeling_tapas.TapasLayer",
        f"{_MODELS}.rembert.modeling_rembert.RemBertLayer",
        f"{_MODELS}.visual_bert.modeling_visual_bert.VisualBertLayer",
    ),
    **BERT_LAYER_PATHS,
    config_checks=(ENCODER_ONLY,),
    head_reads=TEXT_HEAD_READS,
)

# Megatron-BERT: the BERT layer made pre-layer-norm (`attention.ln` before self-attention, `ln`
# before the feed-forward block, plain residual adds in `attention.output` / `output`; the
# embeddings have no LayerNorm and the encoder applies a final `ln` after the stack). Older call
# convention, a tuple returned (always with the attention probabilities). `is_decoder` gives a
# causal mask and a decoder layer, `add_cross_attention` cross-attention: those stay stock.
MEGATRON_BERT = EncoderSpec(
    name="megatron_bert",
    model_types=("megatron-bert",),
    layer_classes=(f"{_MODELS}.megatron_bert.modeling_megatron_bert.MegatronBertLayer",),
    **{**BERT_LAYER_PATHS, "norm1": "attention.ln", "norm2": "ln"},
    norm_first=True,
    config_checks=(ENCODER_ONLY,),
    head_reads=TEXT_HEAD_READS,
)

SPECS: list[EncoderSpec] = [
    BERT_LAYOUT, DISTILBERT, ALBERT, XLM_ROBERTA_XL, ROBERTA_PRELAYERNORM, BERT_LEGACY, MEGATRON_BERT,
]
