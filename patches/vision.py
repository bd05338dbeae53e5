"""Specs for the vision encoder families (image and video towers).

Three layer shapes, all pre-layer-norm, all served by the `packed` kernel; `fastpath` serves those
with exact gelu/relu, all biases and no layer scale (ViT, DeiT, ViT-MAE, ViT-MSN, I-JEPA, Pixio,
YOLOS, DPT):

- ViT style (`ViTLayer` and its copies): `attention.{q,k,v,o}_proj`, `layernorm_before`,
  `mlp.fc1` -> `mlp.activation_fn` -> `mlp.fc2`, `layernorm_after`. The older copies (YOLOS,
  VideoMAE, DPT) keep BERT's names: `attention.attention.{query,key,value}`,
  `attention.output.dense`, `intermediate.dense`, `output.dense`; they are called without a mask.
- DINOv2: the ViT attention with `norm1`/`norm2` and per-channel `layer_scale{1,2}.lambda1`.
- CLIP-style encoder layers (CLIP, SigLIP, SigLIP2 and CLIP's copies): `self_attn.{q,k,v,out}_proj`,
  `layer_norm1`, `mlp.fc1/fc2`, `layer_norm2`; `quick_gelu` / `gelu_pytorch_tanh`: `packed` only.

Model types are the loaded model's `config.model_type`: a tower loaded on its own reports its
sub-config's type (`clip_vision_model`, ...). The two-tower types (`clip`, `siglip`, ...) are
registered with their vision towers; where the text tower is built from the *same* layer class
(CLIP, MetaCLIP 2, OWL-ViT, OWLv2, SigLIP, SigLIP2) its layers are converted too, but a layer
check sends them to the stock forward on every call, because the fused path cannot be exact there:

- CLIP-style text towers are causal. (The core also refuses their calls by itself: the causal
  mask's query rows differ with padding, and without padding SDPA gets no mask but
  `is_causal=True`; the layer check does not depend on how transformers passes causality.)
- SigLIP/SigLIP2 text towers are bidirectional but pool their *last position*, a padding position
  in every padded row (the zero-shot pipeline pads to 64 with a mask): the fused path leaves zeros
  there, so `pooler_output`/`text_embeds` would change.

The text towers loaded on their own (`clip_text_model`, `siglip_text_model`, ...) are not
registered: they stay stock.
"""

from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"


def _config_flag_false(name: str, why: str):
    """A config check: the flag must be falsy, else the model stays stock with `why`."""

    def check(config) -> str | None:
        value = getattr(config, name, False)
        return f"config.{name} was {value!r} ({why})" if value else None

    check.__qualname__ = f"config_flag_false({name!r})"
    return check


# Every layer below computes attention through transformers' attention interface in the versions
# given by `attention_interface` (read off each release): with a replaced projection (an adapter)
# it runs its own code there.

# ViTLayer and its copies (ViT, DeiT, ViT-MAE, ViT-MSN, I-JEPA, Pixio, ViViT): the mask is argument 1.
_VIT_PATHS = dict(
    query="attention.q_proj", key="attention.k_proj", value="attention.v_proj", out_proj="attention.o_proj",
    norm1="layernorm_before", linear1="mlp.fc1", activation="mlp.activation_fn", linear2="mlp.fc2",
    norm2="layernorm_after", num_heads="attention.num_attention_heads", attention_scale="attention.scaling",
    norm_first=True,
    attention_interface=">=4.51",
)

# The BERT-style names every ViT copy had before transformers 5.x renamed them (YOLOS, VideoMAE
# and DPT keep them): `attention.attention.{query,key,value}`, `attention.output.dense`,
# `intermediate.dense`, `output.dense`. Scores use `head_dim ** -0.5` in every version.
_BERT_NAMED_ROLES = dict(
    query="attention.attention.query", key="attention.attention.key", value="attention.attention.value",
    out_proj="attention.output.dense", linear1="intermediate.dense",
    activation="intermediate.intermediate_act_fn", linear2="output.dense",
    num_heads="attention.attention.num_attention_heads", attention_scale=None,
)
_VIT_PATHS["other_layouts"] = (_BERT_NAMED_ROLES,)
_VIT_BERT_NAMED_PATHS = dict(
    _BERT_NAMED_ROLES, norm1="layernorm_before", norm2="layernorm_after", norm_first=True,
    attention_interface=">=4.51",
)

# Before 5.18 (DINOv2) / 5.x (Pixio): BERT-style attention names, `norm1`/`norm2`, `mlp.activation`.
_NORM12_BERT_NAMED = dict(
    {role: _BERT_NAMED_ROLES[role] for role in ("query", "key", "value", "out_proj", "num_heads", "attention_scale")},
    norm1="norm1", norm2="norm2", linear1="mlp.fc1", activation="mlp.activation", linear2="mlp.fc2",
)

# DINOv2 (and with registers): ViT attention, norm1/norm2, LayerScale on both branches.
_DINOV2_PATHS = dict(
    query="attention.q_proj", key="attention.k_proj", value="attention.v_proj", out_proj="attention.o_proj",
    norm1="norm1", linear1="mlp.fc1", activation="mlp.activation_fn", linear2="mlp.fc2", norm2="norm2",
    num_heads="attention.num_attention_heads", attention_scale="attention.scaling",
    layer_scale1="layer_scale1.lambda1", layer_scale2="layer_scale2.lambda1", norm_first=True,
    attention_interface=">=4.51",
    other_layouts=(_NORM12_BERT_NAMED,),
)

# CLIPEncoderLayer and its copies: `layer(hidden_states, attention_mask, **kwargs)`.
_CLIP_PATHS = dict(
    query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj", out_proj="self_attn.out_proj",
    norm1="layer_norm1", linear1="mlp.fc1", activation="mlp.activation_fn", linear2="mlp.fc2",
    norm2="layer_norm2", num_heads="self_attn.num_heads", attention_scale="self_attn.scale", norm_first=True,
    attention_interface=">=4.53",
)

_SWIGLU = _config_flag_false(
    "use_swiglu_ffn", "the SwiGLU feed-forward block (gate/up/down projections) is not a two-linear MLP"
)


def _text_tower_falls_back(why: str):
    """A layer check: layers of a CLIP-style text tower (same layer class as the vision tower)
    run the stock forward; the tower is told apart by its attention's config."""

    def check(layer) -> str | None:
        config = getattr(layer._modules.get("self_attn"), "config", None)
        model_type = getattr(config, "model_type", None) or ""
        if model_type.endswith("_text_model"):
            return f"the layer belongs to the {model_type} tower, which {why}"
        return None

    check.__qualname__ = "text_tower_falls_back"
    return check


# Causal attention: with padding transformers passes a mask whose query rows differ, without it
# (SDPA) no mask at all and `is_causal=True`; the fused layer computes bidirectional attention.
_CAUSAL_TEXT_TOWER = _text_tower_falls_back("is causal (the fused layer attends bidirectionally)")

SPECS: list[EncoderSpec] = [
    # ViT style
    EncoderSpec(name="vit", model_types=("vit",),
                layer_classes=(f"{_MODELS}.vit.modeling_vit.ViTLayer",), **_VIT_PATHS),
    EncoderSpec(name="deit", model_types=("deit",),
                layer_classes=(f"{_MODELS}.deit.modeling_deit.DeiTLayer",), **_VIT_PATHS),
    EncoderSpec(name="vit_mae", model_types=("vit_mae",),
                layer_classes=(f"{_MODELS}.vit_mae.modeling_vit_mae.ViTMAELayer",), **_VIT_PATHS),
    EncoderSpec(name="vit_msn", model_types=("vit_msn",),
                layer_classes=(f"{_MODELS}.vit_msn.modeling_vit_msn.ViTMSNLayer",), **_VIT_PATHS),
    EncoderSpec(name="ijepa", model_types=("ijepa",),
                layer_classes=(f"{_MODELS}.ijepa.modeling_ijepa.IJepaLayer",), **_VIT_PATHS),
    EncoderSpec(name="pixio", model_types=("pixio",),
                layer_classes=(f"{_MODELS}.pixio.modeling_pixio.PixioLayer",),
                **{**_VIT_PATHS, "other_layouts": (_NORM12_BERT_NAMED,)}),
    EncoderSpec(name="vivit", model_types=("vivit",),
                layer_classes=(f"{_MODELS}.vivit.modeling_vivit.VivitLayer",), **_VIT_PATHS),
    EncoderSpec(
        name="yolos", model_types=("yolos",),
        layer_classes=(f"{_MODELS}.yolos.modeling_yolos.YolosLayer",), **_VIT_BERT_NAMED_PATHS,
        config_checks=(_config_flag_false(
            "use_mid_position_embeddings",
            "the encoder adds position embeddings to the hidden states between layers, which the "
            "once-per-stack packing cannot carry",
        ),),
    ),
    EncoderSpec(name="videomae", model_types=("videomae",),
                layer_classes=(f"{_MODELS}.videomae.modeling_videomae.VideoMAELayer",), **_VIT_BERT_NAMED_PATHS),
    EncoderSpec(name="dpt", model_types=("dpt",),
                layer_classes=(f"{_MODELS}.dpt.modeling_dpt.DPTViTLayer",), **_VIT_BERT_NAMED_PATHS),
    # DINOv2
    EncoderSpec(
        name="dinov2", model_types=("dinov2",),
        layer_classes=(f"{_MODELS}.dinov2.modeling_dinov2.Dinov2Layer",), **_DINOV2_PATHS,
        config_checks=(_SWIGLU,),
    ),
    EncoderSpec(
        name="dinov2_with_registers", model_types=("dinov2_with_registers",),
        layer_classes=(
            f"{_MODELS}.dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersLayer",
        ),
        **_DINOV2_PATHS, config_checks=(_SWIGLU,),
    ),
    # CLIP-style contrastive families (attention through the interface since 4.53). OWL-ViT and OWLv2
    # from 5.4 only: before, their attention is their own eager code, and the detection heads
    # amplify its last-bit differences to the SDPA the fused path uses (pred_boxes off by 2e-4
    # with a vision tower within 1e-6, measured on 5.0.0). the composite type (both towers) and the vision tower
    # loaded on its own. Where the text tower is built from the same layer class, its layers are
    # converted too but fall back to the stock forward on every call (`layer_checks`).
    EncoderSpec(name="clip", model_types=("clip", "clip_vision_model"),
                layer_classes=(f"{_MODELS}.clip.modeling_clip.CLIPEncoderLayer",),
                **_CLIP_PATHS, layer_checks=(_CAUSAL_TEXT_TOWER,)),
    EncoderSpec(name="metaclip_2", model_types=("metaclip_2", "metaclip_2_vision_model"),
                layer_classes=(f"{_MODELS}.metaclip_2.modeling_metaclip_2.MetaClip2EncoderLayer",),
                **_CLIP_PATHS, layer_checks=(_CAUSAL_TEXT_TOWER,)),
    EncoderSpec(name="owlvit", model_types=("owlvit", "owlvit_vision_model"),
                layer_classes=(f"{_MODELS}.owlvit.modeling_owlvit.OwlViTEncoderLayer",),
                **_CLIP_PATHS, transformers=">=5.4", layer_checks=(_CAUSAL_TEXT_TOWER,)),
    EncoderSpec(name="owlv2", model_types=("owlv2", "owlv2_vision_model"),
                layer_classes=(f"{_MODELS}.owlv2.modeling_owlv2.Owlv2EncoderLayer",),
                **_CLIP_PATHS, transformers=">=5.4", layer_checks=(_CAUSAL_TEXT_TOWER,)),
    # SigLIP text is bidirectional but pools its LAST position, a padding position in padded
    # rows (the zero-shot pipeline pads to 64): `reads_padding` computes padded rows as stock does.
    EncoderSpec(name="siglip", model_types=("siglip", "siglip_vision_model", "siglip_text_model"),
                layer_classes=(f"{_MODELS}.siglip.modeling_siglip.SiglipEncoderLayer",),
                **{**_CLIP_PATHS, "attention_interface": ">=4.51"}, reads_padding=True),
    EncoderSpec(name="siglip2", model_types=("siglip2", "siglip2_vision_model", "siglip2_text_model"),
                layer_classes=(f"{_MODELS}.siglip2.modeling_siglip2.Siglip2EncoderLayer",),
                **_CLIP_PATHS, reads_padding=True),
    # text towers of their own classes (BERT/XLM-R style, see patches/text.py): only the vision
    # layers match these specs, the text tower of the composite stays stock
    EncoderSpec(name="chinese_clip", model_types=("chinese_clip", "chinese_clip_vision_model"),
                layer_classes=(f"{_MODELS}.chinese_clip.modeling_chinese_clip.ChineseCLIPVisionLayer",),
                **_CLIP_PATHS),
    EncoderSpec(name="altclip", model_types=("altclip", "altclip_vision_model"),
                layer_classes=(f"{_MODELS}.altclip.modeling_altclip.AltCLIPEncoderLayer",), **_CLIP_PATHS),
    # vision towers only: CLIPSeg's and GIT's composites feed the towers in ways not tested here
    EncoderSpec(name="clipseg_vision", model_types=("clipseg_vision_model",),
                layer_classes=(f"{_MODELS}.clipseg.modeling_clipseg.CLIPSegEncoderLayer",), **_CLIP_PATHS),
    EncoderSpec(name="git_vision", model_types=("git_vision_model",),
                layer_classes=(f"{_MODELS}.git.modeling_git.GitVisionEncoderLayer",), **_CLIP_PATHS),
]
