"""A small example model of any registered model type, built from transformers' own config for it,
and inputs for it: what the property tests over every family (tests/test_fuzz_families.py) draw from.

Nothing here names a family: the config comes from `AutoConfig.for_model(model_type)` with its
sizes shrunk by attribute name, the model class from transformers' auto mappings, the inputs from
the model's forward signature. A family added to the registry is built the same way; `OVERRIDES`
holds only what a family's defaults make impossible to build or to convert small (and why).
"""

from __future__ import annotations

import inspect

import torch
import transformers

VOCAB = 1000

# Shrunk wherever a config (or its text/vision/audio sub-config) has the attribute, by name or
# through its `attribute_map`: 2 layers, 2 heads, width 64.
SIZES = {
    "hidden_size": 64, "num_attention_heads": 2, "intermediate_size": 128, "num_hidden_layers": 2,
    "encoder_layers": 2, "decoder_layers": 1, "encoder_attention_heads": 2, "decoder_attention_heads": 2,
    "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "d_ff": 128, "d_kv": 32, "num_heads": 2, "num_layers": 2,
    "num_decoder_layers": 1, "hidden_dim": 128, "n_heads": 2, "n_layers": 2, "dim": 64,
    "patch_size": 8, "projection_dim": 32, "projection_size": 64, "embedding_size": 32, "max_source_positions": 64,
}
SPECIAL_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id", "sep_token_id",
               "cls_token_id", "mask_token_id")

# model type -> config values its defaults lack for a small build (each with the reason)
OVERRIDES: dict[str, dict] = {
    # no default vocabulary (ESM's comes with each checkpoint)
    "esm": dict(vocab_size=33, pad_token_id=1, mask_token_id=32, position_embedding_type="rotary"),
    # the default adds position embeddings between layers, which bt_plugin refuses (the reason is tested elsewhere)
    "yolos": dict(use_mid_position_embeddings=False, image_size=[32, 32], num_detection_tokens=4),
    # the default configs have no relative attention; every released checkpoint has it (v3's settings)
    "deberta-v2": dict(relative_attention=True, position_buckets=32, max_relative_positions=64,
                       pos_att_type=["p2c", "c2p"], norm_rel_ebd="layer_norm", share_att_key=True),
    "deberta": dict(relative_attention=True, pos_att_type=["c2p", "p2c"]),
    # video models: few frames, small tubelets
    "vivit": dict(num_frames=4, tubelet_size=[2, 8, 8], image_size=32),
    "videomae": dict(num_frames=4, tubelet_size=2, image_size=32),
    # no default head size (its checkpoints set one)
    "ministral": dict(head_dim=32),
}

# family -> config values that make a model type build that family's layers rather than another's
FAMILY_OVERRIDES: dict[str, dict] = {
    "wav2vec2-stable-layer-norm": dict(do_stable_layer_norm=True, feat_extract_norm="layer"),
}

# Heads drawn besides the base model: those whose outputs read padded positions come first
HEADS = ("AutoModelForQuestionAnswering", "AutoModelForSequenceClassification", "AutoModelForTokenClassification",
         "AutoModelForCTC", "AutoModelForAudioFrameClassification", "AutoModelForImageClassification",
         "AutoModelForCausalLM")  # the last for decoder families only (see model_classes)


def _sizes(config) -> dict:
    """The config values that make `config`'s model small (sub-configs as dicts of their own)."""
    known = set(config.to_dict()) | set(getattr(config, "attribute_map", {}))
    values = {name: value for name, value in SIZES.items() if name in known}
    if "num_key_value_heads" in known:  # grouped-query heads: 2 query heads share 1 key/value head
        values["num_key_value_heads"] = 1
    if "image_size" in known and isinstance(getattr(config, "image_size"), int):
        values["image_size"] = 32
    if "vocab_size" in known and isinstance(config.vocab_size, int) and config.vocab_size > VOCAB:
        special = [getattr(config, name, None) for name in SPECIAL_IDS]
        if all(not isinstance(value, int) or value < VOCAB for value in special):
            values["vocab_size"] = VOCAB
    for sub in ("text_config", "vision_config", "audio_config"):
        part = getattr(config, sub, None)
        if isinstance(part, transformers.PretrainedConfig):
            values[sub] = {**part.to_dict(), **_sizes(part)}
            values[sub].pop("layer_types", None)  # derived from the layer count
    return values


def example_config(model_type: str, family: str | None = None):
    """transformers' config for `model_type` built small (its own `__init__` derives what depends
    on the sizes), with `OVERRIDES` (and the `FAMILY_OVERRIDES` of `family`)."""
    values = {**OVERRIDES.get(model_type, {}), **FAMILY_OVERRIDES.get(family, {})}
    stem, _, tower = model_type.rpartition("_")[0].rpartition("_")
    if model_type not in transformers.CONFIG_MAPPING and model_type.endswith("_model") and tower in ("text", "vision"):
        # a tower's own model type that this transformers does not register (4.x): the tower's
        # config inside its two-tower model's config
        parent = example_config(stem)
        config = type(getattr(parent, f"{tower}_config"))
        return config(**{**getattr(parent, f"{tower}_config").to_dict(), **values})
    defaults = transformers.AutoConfig.for_model(model_type)
    if getattr(defaults, "pad_token_id", 0) is None and _fills_cache(defaults):
        values.setdefault("pad_token_id", 0)  # a decoder classifier finds each row's last token by it
    return transformers.AutoConfig.for_model(model_type, **{**_sizes(defaults), **values})


def model_classes(config) -> dict[str, type]:
    """`{"base": class, head name: class...}` for this config, from transformers' auto mappings
    (a sub-model config such as `SiglipTextConfig` maps to the class of the same stem)."""
    found = {}
    # an encoder-decoder's heads read the decoder (at its end-of-sequence tokens, over its
    # positions), which needs inputs of their own: the base model reads the encoder already
    heads = () if getattr(config, "is_encoder_decoder", False) else HEADS
    if not _fills_cache(config):  # an encoder's causal-LM class is a decoder configuration it refuses
        heads = tuple(head for head in heads if head != "AutoModelForCausalLM")
    for name in ("AutoModel",) + heads:
        auto = getattr(transformers, name, None)
        try:
            cls = auto._model_mapping[type(config)]
        except (KeyError, AttributeError):
            continue
        found["base" if name == "AutoModel" else name] = cls[0] if isinstance(cls, (tuple, list)) else cls
    if "base" not in found:
        found["base"] = getattr(transformers, type(config).__name__.replace("Config", "Model"))
    return found


def _fills_cache(config) -> bool:
    from bt_plugin.loading import registry

    return any(spec.fills_cache for spec in registry.specs_for_model_type(config.model_type))


def is_seq2seq(model) -> bool:
    return bool(getattr(model.config, "is_encoder_decoder", False))


def _signature(model) -> set[str]:
    return set(inspect.signature(type(model).forward).parameters)


def _vision_config(config):
    return getattr(config, "vision_config", None) or config


def naflex_patches(model, batch: int, generator) -> dict:
    """Siglip2's inputs: patchified images of different shapes padded to the longest, the mask
    marking each image's real patches (padding inside a vision tower)."""
    config = _vision_config(model.config)
    side = int(config.num_patches ** 0.5)
    shapes = torch.randint(1, side + 1, (batch, 2), generator=generator)
    counts = shapes.prod(-1)
    mask = (torch.arange(int(counts.max()))[None, :] < counts[:, None]).long()
    width = config.num_channels * config.patch_size ** 2
    pixels = torch.randn(batch, mask.size(1), width, generator=generator) * mask[..., None]
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def pixel_values(model, batch: int, generator) -> torch.Tensor:
    """Random images (or videos) of the size the config says."""
    config = _vision_config(model.config)
    size = config.image_size if isinstance(config.image_size, (list, tuple)) else [config.image_size] * 2
    channels = getattr(config, "num_channels", 3)
    frames = getattr(config, "num_frames", None)
    shape = (batch, frames, channels, *size) if frames else (batch, channels, *size)
    return torch.randn(*shape, generator=generator)


def text_mask(kind: str, lengths: list[int], width: int, generator) -> torch.Tensor:
    """A `(B, width)` 0/1 mask: right or left padding, holes (each position real with probability
    0.7, at least one per row), no padding, or right padding with one empty row."""
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    if kind == "left":
        mask = mask.flip(1)
    elif kind == "holes":
        mask = (torch.rand(len(lengths), width, generator=generator) < 0.7).long()
        mask[torch.arange(len(lengths)), torch.randint(0, width, (len(lengths),), generator=generator)] = 1
    elif kind == "full":
        mask[:] = 1
    elif kind == "empty_row":
        mask[-1] = 0
    return mask


def example_inputs(model, kind: str, lengths: list[int], width: int, seed: int) -> tuple[dict, torch.Tensor | None]:
    """`(inputs, mask)`: inputs for `model`'s forward and the raw attention mask (None where the
    model takes none: vision, Whisper)."""
    generator = torch.Generator().manual_seed(seed)
    names, config, batch = _signature(model), model.config, len(lengths)
    positions = getattr(getattr(config, "text_config", None) or config, "max_position_embeddings", None)
    if isinstance(positions, int) and width > positions - 2:  # RoBERTa-style ids start after the padding id
        width = max(1, positions - 2)
        lengths = [min(real, width) for real in lengths]
    inputs: dict = {}
    mask = None
    if "input_values" in names:  # raw audio: samples, right padded (a feature extractor's mask)
        samples = 1600 + 160 * width  # at least a few frames after the convolutions (and SEW's pooling)
        lengths = [1600 + 160 * real for real in lengths]
        mask = text_mask("full" if kind == "full" else "right", lengths, samples, generator)
        inputs["input_values"] = torch.randn(batch, samples, generator=generator) * mask
        inputs["attention_mask"] = mask
    elif "input_features" in names:
        if not hasattr(config, "input_feat_per_channel"):  # Whisper: fixed windows of mel bins, no mask
            shape = (batch, config.num_mel_bins, 2 * config.max_source_positions)
            inputs["input_features"] = torch.randn(*shape, generator=generator)
        else:  # Speech2Text: filter-bank frames, right padded
            features = config.input_feat_per_channel * config.input_channels
            frames = 4 * width + 4
            mask = text_mask("full" if kind == "full" else "right", [4 * real + 4 for real in lengths], frames, generator)
            inputs["input_features"] = torch.randn(batch, frames, features, generator=generator)
            inputs["attention_mask"] = mask
    elif "input_ids" in names:
        text = getattr(config, "text_config", None) or config
        vocab = getattr(text, "vocab_size", None) or text.src_vocab_size  # FSMT's in 4.x
        inputs["input_ids"] = torch.randint(5, vocab, (batch, width), generator=generator)
        mask = text_mask(kind, lengths, width, generator)
        inputs["attention_mask"] = mask
    if "spatial_shapes" in names:
        inputs.update(naflex_patches(model, batch, generator))
    elif "pixel_values" in names:
        inputs["pixel_values"] = pixel_values(model, batch, generator)
    if "noise" in names and "pixel_values" in inputs:  # ViT-MAE's random patch masking, made the same
        patches = (_vision_config(config).image_size // _vision_config(config).patch_size) ** 2
        inputs["noise"] = torch.rand(batch, patches, generator=generator)
    if is_seq2seq(model) and "decoder_input_ids" in names:
        start = getattr(config, "decoder_start_token_id", None) or 0
        inputs["decoder_input_ids"] = torch.full((batch, 3), start, dtype=torch.long)
        inputs["use_cache"] = False  # the cache holds cross-attention keys of every encoder position
    return inputs, mask


def feature_mask(model, output_length: int, mask: torch.Tensor) -> torch.Tensor:
    """The real positions of an audio encoder's `(B, output_length, ...)` output, from the sample-
    or feature-level mask: the frames its convolutions make of each row's real samples, or (SEW)
    those frames pooled by its squeeze factor when the output has the pooled length."""
    for owner in (model, getattr(model, "base_model", None), getattr(model, "encoder", None),
                  getattr(getattr(model, "base_model", None), "encoder", None)):
        lengths_of = getattr(owner, "_get_feat_extract_output_lengths", None)
        if lengths_of is not None:
            lengths = lengths_of(mask.sum(-1)).long()
            frames = int(lengths_of(torch.tensor(mask.shape[1])))
            squeeze = getattr(model.config, "squeeze_factor", 1)
            if output_length != frames and squeeze > 1:
                lengths = lengths // squeeze
            return (torch.arange(output_length)[None, :] < lengths[:, None]).long()
    raise AssertionError(f"{type(model).__name__} has no _get_feat_extract_output_lengths")


def output_tensors(output, name: str = "output"):
    """`(name, tensor)` for every floating tensor in a model output, nested outputs included."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield name, output
    elif isinstance(output, dict):
        for key, value in output.items():
            yield from output_tensors(value, f"{name}.{key}")
    elif isinstance(output, (tuple, list)):
        for index, value in enumerate(output):
            yield from output_tensors(value, f"{name}[{index}]")


def read_positions(model, inputs: dict, mask, name: str, tensor: torch.Tensor, every: bool):
    """The `(B, L)` positions of `tensor` the model or its user reads (None: all of it): the real
    tokens of a per-position output, unless the model computes padded positions as stock. A
    two-tower model's vision outputs go by the vision tower's own mask (or have no padding); an
    encoder-decoder's decoder outputs are read everywhere."""
    if is_seq2seq(model) and "encoder" not in name:
        return None
    if any(word in name for word in ("vision", "image")):
        mask = inputs.get("pixel_attention_mask")
    elif mask is None:
        mask = inputs.get("pixel_attention_mask")
    if mask is None or every or tensor.dim() < 2:
        return None
    audio = "input_values" in inputs or "input_features" in inputs
    if audio and tensor.dim() >= 3 and tensor.shape[0] == mask.shape[0]:
        return feature_mask(model, tensor.shape[1], mask).bool()
    if not audio and tuple(tensor.shape[:2]) == tuple(mask.shape):
        return mask.bool()
    return None
