"""Specs for the audio encoder families (transformers 5.x layer code).

wav2vec2 family (wav2vec2, hubert, data2vec-audio, sew, unispeech, unispeech-sat): post-layer-norm
`attention.{q,k,v}_proj` -> `attention.out_proj` -> `layer_norm` -> `feed_forward.intermediate_dense`
-> `feed_forward.intermediate_act_fn` -> `feed_forward.output_dense` -> `final_layer_norm`, called as
`layer(hidden_states, attention_mask=...)` with a frame-level key-padding mask, returning a tensor.
Scaling is `head_dim ** -0.5`. The encoder module owning `layers` is a plain `nn.Module`, so padding
is removed once per stack. (SEW pools frames before its layers and pools the mask the same way.)

`do_stable_layer_norm=True` builds the pre-layer-norm `*EncoderLayerStableLayerNorm` instead. Its
spec is `WAV2VEC2_STABLE_LAYER_NORM` below, ready but NOT registered: the core picks one spec per
`config.model_type`, and one spec has one `norm_first`, so until the core can choose among several
specs of a model type by their config checks, such configs stay stock with a reason.

whisper / speech_to_text: pre-layer-norm BART-style layers, `self_attn.{q,k,v}_proj` (Whisper's
`k_proj` has no bias: the packed kernel serves it, fastpath leaves it stock with a reason),
`self_attn_layer_norm`, `fc1` -> `activation_fn` (an ACT2FN module) -> `fc2`, `final_layer_norm`; the
mask is the second positional argument (Whisper always passes None: it never pads). Only the
`*EncoderLayer` classes are named, so decoder layers stay stock. `encoder_layerdrop` only acts in
training (which runs the stock forward anyway) and `scale_embedding` acts before the layers.

Examined and not registered: wavlm (gated relative position bias added to the scores, layers take
and return `position_bias`), sew-d (disentangled attention), wav2vec2-conformer / wav2vec2-bert /
seamless_m4t speech encoders (conformer blocks: convolution module, relative/rotary positions).
"""

from dataclasses import replace

from bt_plugin.patches.seq2seq import BART_LAYER_PATHS
from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"


def _no_stable_layer_norm(config) -> str | None:
    if getattr(config, "do_stable_layer_norm", False):
        return (
            "config.do_stable_layer_norm was True (the pre-layer-norm layer has its own spec)"
        )
    return None


def _stable_layer_norm_without_adapter(config) -> str | None:
    if not getattr(config, "do_stable_layer_norm", False):
        return "config.do_stable_layer_norm was False (the post-layer-norm layer has its own spec)"
    if getattr(config, "adapter_attn_dim", None) is not None:
        return (
            f"config.adapter_attn_dim was {config.adapter_attn_dim!r} (each layer adds an attention "
            "adapter after the feed-forward block, which the kernels do not compute)"
        )
    return None


_WAV2VEC2_PATHS = dict(
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    out_proj="attention.out_proj",
    norm1="layer_norm",
    linear1="feed_forward.intermediate_dense",
    activation="feed_forward.intermediate_act_fn",
    linear2="feed_forward.output_dense",
    norm2="final_layer_norm",
    num_heads="attention.num_heads",
    attention_interface=">=4.53",  # their attention calls ALL_ATTENTION_FUNCTIONS: adapters run layer code
)

# CTC and frame classification read every frame of a padded batch (`batch_decode(logits.argmax(-1))`).
# The x-vector head pools the TDNN outputs of each row's first `length` frames, but transformers
# computes those lengths without the TDNN dilation, so the pooled frames reach into padding.
# Sequence classification mean-pools the real frames: zeros at padded ones are never read.
AUDIO_HEAD_READS = (("ForCTC", "every"), ("ForAudioFrameClassification", "every"), ("ForXVector", "every"))

WAV2VEC2 = EncoderSpec(
    name="wav2vec2",
    model_types=("wav2vec2", "hubert", "data2vec-audio", "unispeech", "unispeech-sat"),
    layer_classes=(
        f"{_MODELS}.wav2vec2.modeling_wav2vec2.Wav2Vec2EncoderLayer",
        f"{_MODELS}.hubert.modeling_hubert.HubertEncoderLayer",
        f"{_MODELS}.data2vec.modeling_data2vec_audio.Data2VecAudioEncoderLayer",
        f"{_MODELS}.unispeech.modeling_unispeech.UniSpeechEncoderLayer",
        f"{_MODELS}.unispeech_sat.modeling_unispeech_sat.UniSpeechSatEncoderLayer",
    ),
    norm_first=False,
    head_reads=AUDIO_HEAD_READS,
    config_checks=(_no_stable_layer_norm,),
    **_WAV2VEC2_PATHS,
)

# SEW: the same layer, between a squeeze of the frames and an upsampling after the stack. Before
# transformers 5.13 its squeezed mask rounded down, so the real frames at the end of a row were
# upsampled from a padded squeezed position (the encoder itself read padded rows); since 5.13
# the mask is max-pooled.
SEW = replace(
    WAV2VEC2,
    name="sew",
    model_types=("sew",),
    layer_classes=(f"{_MODELS}.sew.modeling_sew.SEWEncoderLayer",),
    transformers=">=5.13",
)

# The pre-LN variant of the same model types: the registry picks, per model type, the first spec
# whose config checks pass, so `do_stable_layer_norm` chooses between the two.
WAV2VEC2_STABLE_LAYER_NORM = replace(
    WAV2VEC2,
    name="wav2vec2-stable-layer-norm",
    model_types=("wav2vec2", "hubert", "unispeech", "unispeech-sat"),
    layer_classes=(
        f"{_MODELS}.wav2vec2.modeling_wav2vec2.Wav2Vec2EncoderLayerStableLayerNorm",
        f"{_MODELS}.hubert.modeling_hubert.HubertEncoderLayerStableLayerNorm",
        f"{_MODELS}.unispeech.modeling_unispeech.UniSpeechEncoderLayerStableLayerNorm",
        f"{_MODELS}.unispeech_sat.modeling_unispeech_sat.UniSpeechSatEncoderLayerStableLayerNorm",
    ),
    norm_first=True,
    config_checks=(_stable_layer_norm_without_adapter,),
)

WHISPER = EncoderSpec(
    name="whisper",
    model_types=("whisper",),
    layer_classes=(f"{_MODELS}.whisper.modeling_whisper.WhisperEncoderLayer",),
    norm_first=True,
    **BART_LAYER_PATHS,
    attention_interface=">=4.53",
)

SPEECH_TO_TEXT = EncoderSpec(
    name="speech_to_text",
    model_types=("speech_to_text",),
    layer_classes=(f"{_MODELS}.speech_to_text.modeling_speech_to_text.Speech2TextEncoderLayer",),
    norm_first=True,
    **BART_LAYER_PATHS,
    attention_interface=">=4.53",
)

SPECS: list[EncoderSpec] = [WAV2VEC2, SEW, WAV2VEC2_STABLE_LAYER_NORM, WHISPER, SPEECH_TO_TEXT]
