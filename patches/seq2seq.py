"""Specs for the ENCODER stacks of the BART-style seq2seq families (transformers 5.x layer code).

Every layer here is `self_attn.{q,k,v}_proj` -> `self_attn.out_proj` with `self_attn_layer_norm`,
then `fc1` -> `activation_fn` (an ACT2FN module) -> `fc2` with `final_layer_norm`; the encoder calls
`layer(hidden_states, attention_mask, **kwargs)` (mask positional, index 1) and the layer returns a
tensor. The attention scale is `self_attn.scaling == head_dim ** -0.5`, the default, so no
`attention_scale` is declared. Only the `*EncoderLayer` classes are named: decoder layers (causal
self-attention, cross-attention, cache) are other classes and stay stock, so `generate()` runs the
stock decoder on the fused encoder's output.

- post-layer-norm ("bart"): bart, marian, blenderbot-small, plbart.
- pre-layer-norm ("mbart"): mbart, m2m_100 (also NLLB checkpoints), pegasus, blenderbot.
- mvp: BART's post-layer-norm layer written the transformers-4 way: it returns
  `(hidden_states, attn_weights)` (the encoder reads `[0]`, and `[1]` only with `output_attentions`,
  a keyword the core refuses to fuse) and takes `self_attn_prompt` (None unless `config.use_prompt`).

No config flag changes the layer math: `scale_embedding` scales the embeddings before the first
layer, `encoder_layerdrop` only skips layers in training (which runs the stock forward anyway),
`activation_function` is whatever ACT2FN module the layer holds (the packed kernel computes any
elementwise one; fastpath only gelu/relu, e.g. Marian's `swish` stays stock there with a reason).
The fp16 `clamp` some of these layers apply after overflow is not reproduced by the kernels (it only
acts on inf/near-max values).

Examined and not registered: fsmt ((T, B, C) layout, `True = padding` mask, `(x, attn)` unpacked
as a 2-tuple), prophetnet (per-head `(B, H, 1, K)` additive mask, which the core does not take), led (Longformer local/global
attention), bigbird_pegasus (block-sparse attention chosen per call, extra band/from/to masks as
keywords), pegasus_x (block-local attention with global tokens; the layer returns a tuple),
nllb_moe (mixture-of-experts feed-forward).
"""

from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"

# The attribute paths of BART-style encoder layers (fairseq naming), shared with the speech
# encoders of patches/audio.py (Whisper, Speech2Text).
BART_LAYER_PATHS = dict(
    query="self_attn.q_proj",
    key="self_attn.k_proj",
    value="self_attn.v_proj",
    out_proj="self_attn.out_proj",
    norm1="self_attn_layer_norm",
    linear1="fc1",
    activation="activation_fn",
    linear2="fc2",
    norm2="final_layer_norm",
    num_heads="self_attn.num_heads",
)

BART = EncoderSpec(
    name="bart",
    model_types=("bart", "marian", "blenderbot-small", "plbart"),
    layer_classes=(
        f"{_MODELS}.bart.modeling_bart.BartEncoderLayer",
        f"{_MODELS}.marian.modeling_marian.MarianEncoderLayer",
        f"{_MODELS}.blenderbot_small.modeling_blenderbot_small.BlenderbotSmallEncoderLayer",
        f"{_MODELS}.plbart.modeling_plbart.PLBartEncoderLayer",
    ),
    norm_first=False,
    **BART_LAYER_PATHS,
    attention_interface=">=4.53",  # calls ALL_ATTENTION_FUNCTIONS (MVP and FSMT do not)
)

MBART = EncoderSpec(
    name="mbart",
    model_types=("mbart", "m2m_100", "pegasus", "blenderbot"),
    layer_classes=(
        f"{_MODELS}.mbart.modeling_mbart.MBartEncoderLayer",
        f"{_MODELS}.m2m_100.modeling_m2m_100.M2M100EncoderLayer",
        f"{_MODELS}.pegasus.modeling_pegasus.PegasusEncoderLayer",
        f"{_MODELS}.blenderbot.modeling_blenderbot.BlenderbotEncoderLayer",
    ),
    norm_first=True,
    **BART_LAYER_PATHS,
    attention_interface=">=4.53",  # calls ALL_ATTENTION_FUNCTIONS (MVP and FSMT do not)
)



def _no_prompts(config) -> str | None:
    if getattr(config, "use_prompt", False):
        return "config.use_prompt was True (learned prompt keys/values are prepended in every attention)"
    return None


MVP = EncoderSpec(
    name="mvp",
    model_types=("mvp",),
    layer_classes=(f"{_MODELS}.mvp.modeling_mvp.MvpEncoderLayer",),
    norm_first=False,
    config_checks=(_no_prompts,),
    **BART_LAYER_PATHS,
)

# FSMT keeps fairseq's legacy conventions: (T, B, C) hidden states, a (B, T) mask that marks
# padding with 1, and `(x, attention_weights)` returned by every layer.
FSMT = EncoderSpec(
    name="fsmt",
    model_types=("fsmt",),
    layer_classes=(f"{_MODELS}.fsmt.modeling_fsmt.EncoderLayer",),
    **{**BART_LAYER_PATHS, "mask_argument": "encoder_padding_mask"},
    sequence_first=True,
    mask_marks_padding=True,
)

SPECS: list[EncoderSpec] = [FSMT, BART, MBART, MVP]
