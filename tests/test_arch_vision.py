"""Parity of the vision families of `patches/vision.py` against stock transformers, per kernel.

Every registered model type gets a realistic-width model (hidden 256, 4 heads, 2-3 layers, the
architecture's own defaults otherwise; small images) that is saved once and loaded twice through
`from_pretrained`: stock, and inside `bt_plugin.enabled(kernel=...)`. Each comparison also checks
through `bt_plugin.explain` that every encoder layer ran fused for that call (parity alone cannot
tell a fused run from a silent fallback to the exact stock forward); the text towers of the
CLIP-style composites must instead fall back on every call, with their reason. Where `fastpath`
cannot serve a family (activation, layer scale, missing bias) the model must stay stock with the
reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import inspect

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.dispatch.eligibility import structure_reason
from bt_plugin.dispatch.layer import FusedLayer
from bt_plugin.patches import vision
from bt_plugin.spec import ROLES, OPTIONAL_ROLES, resolve_path, resolve_roles

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
KERNELS = ["packed", "fastpath"]
WIDTH = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=3)
TOWER = dict(WIDTH, num_hidden_layers=2)  # each tower of a two-tower model
IMAGE = dict(image_size=32, patch_size=8)
TEXT = dict(vocab_size=1000, max_position_embeddings=16, bos_token_id=0, eos_token_id=2, pad_token_id=1)


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=_generator(seed))}


def videos(batch: int, seed: int) -> dict:
    return {"pixel_values": torch.randn(batch, 4, 3, 32, 32, generator=_generator(seed))}


def mae_images(batch: int, seed: int) -> dict:
    """ViT-MAE masks patches at random: a fixed `noise` makes both models keep the same ones."""
    return {**images(batch, seed), "noise": torch.rand(batch, (32 // 8) ** 2, generator=_generator(seed + 100))}


# Siglip2's NaFlex inputs: patchified pixels padded to the batch's longest image; the mask marks
# each image's real patches (padding inside a vision tower, as its image processor produces).
SIGLIP2_SHAPES = [(4, 4), (2, 3), (3, 5), (1, 2)]


def siglip2_patches(batch: int, seed: int) -> dict:
    shapes = torch.tensor(SIGLIP2_SHAPES[:batch] if batch > 1 else [(3, 4)])
    counts = shapes.prod(-1)
    mask = (torch.arange(int(counts.max()))[None, :] < counts[:, None]).long()
    pixels = torch.randn(batch, mask.size(1), 3 * 8 * 8, generator=_generator(seed)) * mask[..., None]
    return {"pixel_values": pixels, "pixel_attention_mask": mask, "spatial_shapes": shapes}


def tokens(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded `(input_ids, attention_mask)` with the given real lengths."""
    ids = torch.randint(5, 1000, (len(lengths), width), generator=_generator(seed))
    mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
    return ids.masked_fill(mask == 0, TEXT["pad_token_id"]), mask


def with_text(pixels: Callable[[int, int], dict]) -> Callable[[int, int], dict]:
    """Inputs of a two-tower model: a padded token batch and the images (one text per image)."""

    def make(batch: int, seed: int) -> dict:
        ids, mask = tokens([12, 7, 3][:batch] if batch > 1 else [9], 12, seed + 50)
        return {"input_ids": ids, "attention_mask": mask, **pixels(batch, seed)}

    return make


# --------------------------------------------------------------------------------------------
# the families
# --------------------------------------------------------------------------------------------


def _randomize_layer_scale(model) -> None:
    """Trained DINOv2 checkpoints have per-channel layer scales far from the init value 1.0."""
    generator = _generator(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lambda1"):
                param.copy_(torch.rand(param.shape, generator=generator) * 0.9 + 0.1)


def _trained_box_heads(model) -> None:
    """OWL-ViT's box and objectness heads initialize at unit scale: at test width they output about
    5000 before a sigmoid, so float32 rounding of their features (4e-6, either GEMM library) turns
    into 4e-4 of a box coordinate. A trained head's linears have weights of order fan_in**-0.5."""
    generator = _generator(11)
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.split(".")[0] in ("box_head", "objectness_head") and isinstance(module, torch.nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * module.in_features ** -0.5)


def _no_real_positions(inputs: dict) -> list[torch.Tensor]:
    return []


def _text_positions(inputs: dict) -> list[torch.Tensor]:
    return [inputs[key].bool() for key in ("attention_mask", "pixel_attention_mask") if key in inputs]


@dataclass(frozen=True)
class Case:
    """One model type: its config (real defaults at test width), base and head classes, inputs."""

    config: Callable[[], object]
    base: str
    head: str | None  # a task-head class of the same model type (None: the type has none)
    inputs: Callable[[int, int], dict] = images
    head_inputs: Callable[[int, int], dict] | None = None  # when the head takes other inputs
    # None: fastpath serves every layer; else a part of the reason it leaves the model stock
    fastpath_refused: str | None = None
    prepare: Callable | None = None
    # `(B, L)` masks of real positions: `(B, L, E)` outputs of that shape compare on them only
    real_positions: Callable[[dict], list[torch.Tensor]] = _no_real_positions
    # layers whose path contains this must fall back on every call, with a reason containing one of...
    falls_back: tuple[str, tuple[str, ...]] | None = None
    base_overrides: tuple = ()


def _config(name: str, **values):
    return lambda: getattr(transformers, name)(**values)


def _two_towers(name: str, vision: dict, **values):
    return _config(name, text_config=dict(TOWER, **TEXT), vision_config=dict(TOWER, **vision), **values)


# the core's own kwargs check (`is_causal=True` under SDPA), its mask check (the causal mask's query
# rows differ) or, before either, the spec's layer check: whichever names the call first
CAUSAL = ("text_model.", ("is causal", "is_causal was passed", "causal_attention_mask was passed",
                          "differed between query rows"))
QUICK_GELU = "activation was quick_gelu"
GELU_TANH = "activation was gelu_tanh"

CASES: dict[str, Case] = {
    # ViT style
    "vit": Case(_config("ViTConfig", **WIDTH, **IMAGE), "ViTModel", "ViTForImageClassification"),
    "deit": Case(_config("DeiTConfig", **WIDTH, **IMAGE), "DeiTModel", "DeiTForImageClassificationWithTeacher"),
    "vit_mae": Case(
        _config("ViTMAEConfig", **WIDTH, **IMAGE, decoder_hidden_size=256, decoder_num_hidden_layers=2,
                decoder_num_attention_heads=4, decoder_intermediate_size=1024),
        "ViTMAEModel", "ViTMAEForPreTraining", inputs=mae_images,
    ),
    "vit_msn": Case(_config("ViTMSNConfig", **WIDTH, **IMAGE), "ViTMSNModel", "ViTMSNForImageClassification"),
    "ijepa": Case(_config("IJepaConfig", **WIDTH, **IMAGE), "IJepaModel", "IJepaForImageClassification"),
    "pixio": Case(  # no task head: its backbone class instead
        _config("PixioConfig", hidden_size=256, num_attention_heads=4, num_hidden_layers=3, **IMAGE),
        "PixioModel", "PixioBackbone",
    ),
    "vivit": Case(
        _config("VivitConfig", **WIDTH, image_size=32, num_frames=4, tubelet_size=[2, 8, 8]),
        "VivitModel", "VivitForVideoClassification", inputs=videos, fastpath_refused=GELU_TANH,
    ),
    "yolos": Case(
        # the real YOLOS defaults (100 detection tokens) except the mid-layer position embeddings,
        # which leave the model stock (test_yolos_mid_position_embeddings_stay_stock)
        _config("YolosConfig", **WIDTH, image_size=[32, 32], patch_size=8, use_mid_position_embeddings=False),
        "YolosModel", "YolosForObjectDetection",
    ),
    "videomae": Case(
        _config("VideoMAEConfig", **WIDTH, **IMAGE, num_frames=4, tubelet_size=2),
        "VideoMAEModel", "VideoMAEForVideoClassification", inputs=videos,
        fastpath_refused="had no bias",  # VideoMAE's key projection has no bias
    ),
    "dpt": Case(
        # its depth head reassembles four hidden states: the one family built with 4 layers
        _config("DPTConfig", **dict(WIDTH, num_hidden_layers=4), **IMAGE, backbone_out_indices=[0, 1, 2, 3]),
        "DPTModel", "DPTForDepthEstimation",
    ),
    # DINOv2
    "dinov2": Case(
        _config("Dinov2Config", hidden_size=256, num_attention_heads=4, num_hidden_layers=3, **IMAGE),
        "Dinov2Model", "Dinov2ForImageClassification",
        fastpath_refused="scales its residual branches", prepare=_randomize_layer_scale,
    ),
    "dinov2_with_registers": Case(
        _config("Dinov2WithRegistersConfig", hidden_size=256, num_attention_heads=4, num_hidden_layers=3, **IMAGE),
        "Dinov2WithRegistersModel", "Dinov2WithRegistersForImageClassification",
        fastpath_refused="scales its residual branches", prepare=_randomize_layer_scale,
    ),
    # CLIP style: two-tower models (text layers fall back) and vision towers on their own
    "clip": Case(
        _two_towers("CLIPConfig", IMAGE), "CLIPModel", "CLIPForImageClassification",
        inputs=with_text(images), head_inputs=images, fastpath_refused=QUICK_GELU, real_positions=_text_positions, falls_back=CAUSAL,
    ),
    "clip_vision_model": Case(
        _config("CLIPVisionConfig", **WIDTH, **IMAGE, projection_dim=128),
        "CLIPVisionModel", "CLIPVisionModelWithProjection", fastpath_refused=QUICK_GELU,
    ),
    "metaclip_2": Case(
        _two_towers("MetaClip2Config", IMAGE), "MetaClip2Model", "MetaClip2ForImageClassification",
        inputs=with_text(images), head_inputs=images, fastpath_refused=QUICK_GELU, real_positions=_text_positions, falls_back=CAUSAL,
    ),
    "metaclip_2_vision_model": Case(
        _config("MetaClip2VisionConfig", **WIDTH, **IMAGE, projection_dim=128),
        "MetaClip2VisionModel", "MetaClip2VisionModelWithProjection", fastpath_refused=QUICK_GELU,
    ),
    "owlvit": Case(
        _two_towers("OwlViTConfig", IMAGE, projection_dim=256), "OwlViTModel", "OwlViTForObjectDetection",
        inputs=with_text(images), fastpath_refused=QUICK_GELU, real_positions=_text_positions, falls_back=CAUSAL,
        prepare=_trained_box_heads,
    ),
    "owlvit_vision_model": Case(
        _config("OwlViTVisionConfig", **WIDTH, **IMAGE), "OwlViTVisionModel", None, fastpath_refused=QUICK_GELU,
    ),
    "owlv2": Case(
        _two_towers("Owlv2Config", IMAGE, projection_dim=256), "Owlv2Model", "Owlv2ForObjectDetection",
        inputs=with_text(images), fastpath_refused=QUICK_GELU, real_positions=_text_positions, falls_back=CAUSAL,
        prepare=_trained_box_heads,
    ),
    "owlv2_vision_model": Case(
        _config("Owlv2VisionConfig", **WIDTH, **IMAGE), "Owlv2VisionModel", None, fastpath_refused=QUICK_GELU,
    ),
    "siglip": Case(
        _two_towers("SiglipConfig", IMAGE), "SiglipModel", "SiglipForImageClassification",
        inputs=with_text(images), head_inputs=images, fastpath_refused=GELU_TANH, real_positions=_text_positions,
    ),
    "siglip_vision_model": Case(
        # the base model without the attention-pooling head; the "head" is the default config with it
        _config("SiglipVisionConfig", **WIDTH, **IMAGE), "SiglipVisionModel", "SiglipVisionModel",
        fastpath_refused=GELU_TANH, base_overrides=(("vision_use_head", False),),
    ),
    "siglip2": Case(
        _two_towers("Siglip2Config", dict(patch_size=8, num_patches=64)), "Siglip2Model",
        "Siglip2ForImageClassification", inputs=with_text(siglip2_patches), head_inputs=siglip2_patches,
        fastpath_refused=GELU_TANH,
        real_positions=_text_positions,
    ),
    "siglip2_vision_model": Case(
        _config("Siglip2VisionConfig", **WIDTH, patch_size=8, num_patches=64), "Siglip2VisionModel",
        "Siglip2VisionModel", inputs=siglip2_patches, fastpath_refused=GELU_TANH,
        real_positions=_text_positions, base_overrides=(("vision_use_head", False),),
    ),
    # BERT-style text towers of their own classes: only the vision tower is converted
    "chinese_clip": Case(
        _two_towers("ChineseCLIPConfig", IMAGE), "ChineseCLIPModel", None,
        inputs=with_text(images), fastpath_refused=QUICK_GELU, real_positions=_text_positions,
    ),
    "chinese_clip_vision_model": Case(
        _config("ChineseCLIPVisionConfig", **WIDTH, **IMAGE), "ChineseCLIPVisionModel", None,
        fastpath_refused=QUICK_GELU,
    ),
    "altclip": Case(
        _config("AltCLIPConfig", text_config=dict(TOWER, **TEXT, project_dim=128),
                vision_config=dict(TOWER, **IMAGE)),
        "AltCLIPModel", None, inputs=with_text(images), fastpath_refused=QUICK_GELU, real_positions=_text_positions,
    ),
    "altclip_vision_model": Case(
        _config("AltCLIPVisionConfig", **WIDTH, **IMAGE), "AltCLIPVisionModel", None, fastpath_refused=QUICK_GELU,
    ),
    "clipseg_vision_model": Case(
        _config("CLIPSegVisionConfig", **WIDTH, **IMAGE), "CLIPSegVisionModel", None, fastpath_refused=QUICK_GELU,
    ),
    "git_vision_model": Case(
        _config("GitVisionConfig", **WIDTH, **IMAGE), "GitVisionModel", None, fastpath_refused=QUICK_GELU,
    ),
}


# --------------------------------------------------------------------------------------------
# fixtures
# --------------------------------------------------------------------------------------------


def _model_class(model_type: str, head: bool):
    case = CASES[model_type]
    return getattr(transformers, case.head if head else case.base)


def _build(model_type: str, head: bool, **overrides):
    case = CASES[model_type]
    config = case.config()
    for key, value in {**({} if head else dict(case.base_overrides)), **overrides}.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    model = _model_class(model_type, head)(config)
    if case.prepare:
        case.prepare(model)
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(model_type, head, **overrides)` -> directory; each model is saved once."""
    cache: dict[tuple, str] = {}

    def get(model_type: str, head: bool = False, **overrides) -> str:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model_type}-{'head' if head else 'base'}")
            _build(model_type, head, **overrides).save_pretrained(str(directory))
            cache[key] = str(directory)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def loaded(saved):
    """`loaded(model_type, head, kernel)` -> (stock, loaded inside enabled(kernel)), each loaded once."""
    stock_cache: dict[tuple, object] = {}
    fused_cache: dict[tuple, object] = {}

    def get(model_type: str, head: bool, kernel: str):
        path, cls = saved(model_type, head), _model_class(model_type, head)
        if (model_type, head) not in stock_cache:
            stock_cache[(model_type, head)] = cls.from_pretrained(path).eval()
        if (model_type, head, kernel) not in fused_cache:
            with bt_plugin.enabled(kernel=kernel):
                fused_cache[(model_type, head, kernel)] = cls.from_pretrained(path).eval()
        return stock_cache[(model_type, head)], fused_cache[(model_type, head, kernel)]

    return get


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


def _stats(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _assert_stock(model) -> None:
    assert not bt_plugin.is_converted(model)
    assert not any(isinstance(m, FusedLayer) for m in model.modules())


def _served(model_type: str, kernel: str) -> bool:
    return not (kernel == "fastpath" and CASES[model_type].fastpath_refused)


def _falls_back(model_type: str, path: str) -> bool:
    rule = CASES[model_type].falls_back
    return rule is not None and rule[0] in path


def _assert_fastpath_refused(model_type: str, model) -> None:
    """fastpath cannot serve the family: the load stays stock, explain names the reason per layer."""
    _assert_stock(model)
    report = bt_plugin.explain(model, kernel="fastpath")
    assert report.layers, str(report)
    for layer in report.layers:
        assert not layer.converted
        assert layer.reason and CASES[model_type].fastpath_refused in layer.reason, str(report)


def _assert_converted(model, stock, kernel: str) -> None:
    assert bt_plugin.is_converted(model)
    report = bt_plugin.explain(model)
    assert report.reason is None, str(report)
    assert report.layers and len(report.layers) == len(bt_plugin.explain(stock).layers)
    for layer in report.layers:
        assert layer.converted and layer.kernel == kernel, str(report)


def _pair(loaded, model_type: str, head: bool, kernel: str):
    stock, other = loaded(model_type, head, kernel)
    _assert_stock(stock)
    if _served(model_type, kernel):
        _assert_converted(other, stock, kernel)
    else:
        _assert_fastpath_refused(model_type, other)
    return stock, other


# --------------------------------------------------------------------------------------------
# comparisons
# --------------------------------------------------------------------------------------------


def _pairs(expected, actual, prefix: str = ""):
    """Yield `(name, want, got)` for every tensor of two model outputs (tuples, outputs recursed)."""
    if isinstance(expected, torch.Tensor):
        yield prefix, expected, actual
        return
    if isinstance(expected, (tuple, list)):
        assert isinstance(actual, (tuple, list)) and len(actual) == len(expected), prefix
        for index, (want, got) in enumerate(zip(expected, actual)):
            yield from _pairs(want, got, f"{prefix}[{index}]")
        return
    if hasattr(expected, "keys"):  # ModelOutput
        assert list(expected.keys()) == list(actual.keys()), (list(expected.keys()), list(actual.keys()))
        for key in expected.keys():
            yield from _pairs(expected[key], actual[key], f"{prefix}.{key}")


def _assert_outputs_close(expected, actual, real: list[torch.Tensor]) -> int:
    """Every tensor output within ATOL; `(B, L, E)` tensors with a real-position mask of their
    `(B, L)` shape are compared on real positions only (padded positions are zeros when fused)."""
    compared = 0
    for name, want, got in _pairs(expected, actual):
        assert got.shape == want.shape and got.dtype == want.dtype, name
        keep = next((m for m in real if want.dim() == 3 and want.shape[:2] == m.shape), None)
        if not want.is_floating_point():
            assert torch.equal(want, got), name
        elif keep is not None:
            diff = (want[keep] - got[keep]).abs().max().item()
            assert diff <= ATOL, f"{name} differs on real positions by {diff:.3g}"
        else:
            diff = (want - got).abs().max().item() if want.numel() else 0.0
            # head outputs far from 1 (OWL-ViT's scaled logits reach ~700) carry fp32's relative
            # precision: 1e-5 absolute, or 1e-6 of the largest magnitude (8 ulps) above 10
            scale = want.abs().max().item() if want.numel() else 0.0
            assert diff <= max(ATOL, 1e-6 * scale), f"{name} differs by {diff:.3g} (largest {scale:.3g})"
        compared += 1
    return compared


def _compare(model_type: str, kernel: str, stock, other, inputs: dict):
    """Run both; every converted layer must have run fused exactly once for this call (text-tower
    layers of the CLIP-style composites: fallen back once, with their reason)."""
    before = _stats(other)
    with torch.inference_mode():
        expected = stock(**inputs)
        actual = other(**inputs)
    if _served(model_type, kernel):
        report = bt_plugin.explain(other)
        fused = 0
        for (f0, b0), (f1, b1), layer in zip(before, _stats(other), report.layers):
            if _falls_back(model_type, layer.path):
                assert (f1, b1 - b0) == (0, 1), f"{layer.path} did not fall back:\n{report}"
                assert any(part in layer.reason for part in CASES[model_type].falls_back[1]), str(report)
            else:
                assert f1 - f0 == 1, f"{layer.path} did not run fused:\n{report}"
                assert b1 == b0 == 0, f"{layer.path} fell back:\n{report}"
                assert layer.reason is None, str(report)
                fused += 1
        assert fused >= 2, str(report)
    else:
        _assert_fastpath_refused(model_type, other)
    _assert_stock(stock)
    assert _assert_outputs_close(expected, actual, CASES[model_type].real_positions(inputs)) >= 1
    return expected, actual


def _hidden_state_tuples(output) -> list[tuple]:
    if "hidden_states" in output:
        return [output.hidden_states]
    return [output[key].hidden_states for key in ("text_model_output", "vision_model_output") if key in output]


MODEL_TYPES = list(CASES)


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_of_several(model_type, kernel, loaded):
    stock, other = _pair(loaded, model_type, head=False, kernel=kernel)
    _compare(model_type, kernel, stock, other, CASES[model_type].inputs(3, 1))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_of_one(model_type, kernel, loaded):
    stock, other = _pair(loaded, model_type, head=False, kernel=kernel)
    _compare(model_type, kernel, stock, other, CASES[model_type].inputs(1, 2))


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states(model_type, kernel, loaded):
    stock, other = _pair(loaded, model_type, head=False, kernel=kernel)
    inputs = {**CASES[model_type].inputs(2, 3), "output_hidden_states": True}
    expected, actual = _compare(model_type, kernel, stock, other, inputs)  # every hidden state compared
    recorded = _hidden_state_tuples(expected)
    assert recorded
    assert [states is None for states in _hidden_state_tuples(actual)] == [states is None for states in recorded]
    if all(states is not None for states in recorded):  # composite models of transformers 5.0 return none
        assert [len(s) for s in _hidden_state_tuples(actual)] == [len(s) for s in recorded]
        image_layers = [layer for layer in bt_plugin.explain(stock).layers if "text_model." not in layer.path]
        assert len(recorded[-1]) == len(image_layers) + 1  # the image tower's (the only one's) states
    # after a call that recorded hidden states, a plain call is still fused and exact
    _compare(model_type, kernel, stock, other, CASES[model_type].inputs(2, 4))


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if CASES[t].head])
def test_task_head(model_type, kernel, loaded):
    stock, other = _pair(loaded, model_type, head=True, kernel=kernel)
    case = CASES[model_type]
    _compare(model_type, kernel, stock, other, (case.head_inputs or case.inputs)(3, 5))


# ViT-style models take an optional (B, L) attention mask over their tokens: padding inside a
# vision encoder. The first token ([CLS], which the poolers read) stays real.
PATCH_MASKS = {
    "right": lambda keep: keep,  # trailing patches padded: both kernels
    "leading": lambda keep: torch.cat([keep[:, :1], keep[:, 1:].flip(1)], dim=1),  # packed only
    "gaps": lambda keep: keep & (torch.arange(keep.size(1)) % 4 != 2),  # packed only
}


@pytest.mark.parametrize(
    "model_type,case,kernel",
    [(t, case, k) for t in ("vit", "dinov2", "ijepa") for case in PATCH_MASKS for k in KERNELS
     if k == "packed" or case == "right"],
)
def test_patch_attention_mask(model_type, case, kernel, loaded):
    stock, other = _pair(loaded, model_type, head=False, kernel=kernel)
    if "attention_mask" not in inspect.signature(type(stock).forward).parameters:
        pytest.skip(f"{type(stock).__name__} takes no attention mask in transformers {transformers.__version__}")
    inputs = CASES[model_type].inputs(3, 6)
    with torch.inference_mode():
        length = stock(**inputs).last_hidden_state.size(1)
    keep = PATCH_MASKS[case](torch.arange(length)[None, :] < torch.tensor([length, 9, 4])[:, None])
    assert bool(keep[:, 0].all()) and not bool(keep.all())
    inputs["attention_mask"] = keep.long()
    before = _stats(other)
    with torch.inference_mode():
        expected, actual = stock(**inputs), other(**inputs)
    if _served(model_type, kernel):
        report = bt_plugin.explain(other)
        assert all(f1 - f0 == 1 and b1 == 0 for (f0, _), (f1, b1) in zip(before, _stats(other))), str(report)
    else:
        _assert_fastpath_refused(model_type, other)
    assert _assert_outputs_close(expected, actual, [keep]) >= 1


@pytest.mark.parametrize("model_type", ["clip"])
def test_text_features_of_an_unpadded_batch_fall_back(model_type, loaded):
    """Without padding transformers passes CLIP's text layers no mask (SDPA, `is_causal=True`):
    the layer check still sends them to the stock forward; the image features stay fused."""
    stock, other = _pair(loaded, model_type, head=False, kernel="packed")
    ids, mask = tokens([10, 10], 10, seed=8)
    before = _stats(other)
    with torch.inference_mode():
        want = stock.get_text_features(input_ids=ids)
        got = other.get_text_features(input_ids=ids)
        want_images = stock.get_image_features(**images(2, 8))
        got_images = other.get_image_features(**images(2, 8))
    report = bt_plugin.explain(other)
    for (f0, b0), (f1, b1), layer in zip(before, _stats(other), report.layers):
        if "text_model." in layer.path:
            assert (f1 - f0, b1 - b0) == (0, 1), str(report)
            assert any(part in layer.reason for part in CASES[model_type].falls_back[1]), str(report)
        else:
            assert (f1 - f0, b1 - b0) == (1, 0), str(report)
    assert _assert_outputs_close(want, got, []) >= 1
    assert _assert_outputs_close(want_images, got_images, []) >= 1


# --------------------------------------------------------------------------------------------
# configurations and towers that stay stock
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["dinov2", "dinov2_with_registers"])
def test_dinov2_swiglu_stays_stock(model_type, saved):
    path = saved(model_type, False, use_swiglu_ffn=True)
    with bt_plugin.enabled(kernel="packed"):
        model = _model_class(model_type, False).from_pretrained(path).eval()
    assert model.config.use_swiglu_ffn
    _assert_stock(model)
    report = bt_plugin.explain(model)
    assert report.reason and "use_swiglu_ffn" in report.reason, str(report)
    with pytest.raises(ValueError, match="use_swiglu_ffn"):
        bt_plugin.convert(model)


def test_yolos_mid_position_embeddings_stay_stock(saved):
    path = saved("yolos", False, use_mid_position_embeddings=True)  # the YolosConfig default
    with bt_plugin.enabled(kernel="packed"):
        model = transformers.YolosModel.from_pretrained(path).eval()
    _assert_stock(model)
    report = bt_plugin.explain(model)
    assert report.reason and "use_mid_position_embeddings" in report.reason, str(report)
    stock = transformers.YolosModel.from_pretrained(path).eval()
    inputs = images(2, 9)
    with torch.inference_mode():
        assert torch.equal(stock(**inputs).last_hidden_state, model(**inputs).last_hidden_state)


TEXT_TOWERS = {
    # causal: with padding the mask's query rows differ; without, SDPA gets no mask, `is_causal=True`
    "clip_text_model": ("CLIPTextConfig", "CLIPTextModel"),
}
SIGLIP_TEXT_TOWERS = {
    # bidirectional, but the pooled embedding is the LAST position, a padding position when padded:
    # the spec's `reads_padding` makes packed compute padded rows exactly as stock does
    "siglip_text_model": ("SiglipTextConfig", "SiglipTextModel"),
    "siglip2_text_model": ("Siglip2TextConfig", "Siglip2TextModel"),
}


@pytest.mark.parametrize("model_type", list(SIGLIP_TEXT_TOWERS))
def test_siglip_text_towers_are_exact_at_every_position(model_type, tmp_path):
    config_name, model_name = SIGLIP_TEXT_TOWERS[model_type]
    cls = getattr(transformers, model_name)
    torch.manual_seed(0)
    cls(getattr(transformers, config_name)(**TEXT, **WIDTH)).save_pretrained(str(tmp_path))
    stock = cls.from_pretrained(str(tmp_path)).eval()
    with bt_plugin.enabled(kernel="packed"):
        model = cls.from_pretrained(str(tmp_path)).eval()
    ids, mask = tokens([12, 7, 3], 12, seed=11)
    with torch.inference_mode():
        for attention_mask in (mask, None):
            want = stock(input_ids=ids, attention_mask=attention_mask)
            got = model(input_ids=ids, attention_mask=attention_mask)
            # every position, padded ones included: the pooled output reads the last one
            assert (want.last_hidden_state - got.last_hidden_state).abs().max().item() <= 1e-5
            assert (want.pooler_output - got.pooler_output).abs().max().item() <= 1e-5
    report = bt_plugin.explain(model)
    assert all(layer.fused_calls == 2 and layer.fallback_calls == 0 for layer in report.layers), str(report)
    with bt_plugin.enabled(kernel="fastpath"):
        model = cls.from_pretrained(str(tmp_path)).eval()
    assert not bt_plugin.is_converted(model)  # gelu_tanh; and fastpath drops padded rows


@pytest.mark.parametrize("model_type", list(TEXT_TOWERS))
def test_text_towers_on_their_own_stay_stock(model_type, tmp_path):
    config_name, model_name = TEXT_TOWERS[model_type]
    cls = getattr(transformers, model_name)
    torch.manual_seed(0)
    cls(getattr(transformers, config_name)(**TEXT, **WIDTH)).save_pretrained(str(tmp_path))
    with bt_plugin.enabled(kernel="packed"):
        model = cls.from_pretrained(str(tmp_path)).eval()
    assert model.config.model_type == model_type
    _assert_stock(model)
    report = bt_plugin.explain(model)
    assert report.reason and "is not supported" in report.reason, str(report)
    stock = cls.from_pretrained(str(tmp_path)).eval()
    ids, mask = tokens([12, 7, 3], 12, seed=11)
    with torch.inference_mode():
        for attention_mask in (mask, None):
            want = stock(input_ids=ids, attention_mask=attention_mask)
            got = model(input_ids=ids, attention_mask=attention_mask)
            assert torch.equal(want.last_hidden_state, got.last_hidden_state)
            assert torch.equal(want.pooler_output, got.pooler_output)


# --------------------------------------------------------------------------------------------
# the specs themselves
# --------------------------------------------------------------------------------------------


def test_every_spec_model_type_has_a_parity_case():
    covered = [t for spec in vision.SPECS for t in spec.model_types if t not in SIGLIP_TEXT_TOWERS]
    assert sorted(covered) == sorted(CASES)  # and no model type twice (text towers: their own test)
    assert len({spec.name for spec in vision.SPECS}) == len(vision.SPECS)


@pytest.mark.parametrize("spec", vision.SPECS, ids=lambda spec: spec.name)
def test_spec_resolves_on_a_real_model(spec, loaded):
    classes = spec.resolve_layer_classes()
    assert len(classes) == len(spec.layer_classes), spec.layer_classes
    assert registry.all_specs().get(spec.name) is spec, f"{spec.name} is not registered through the entry point"
    for model_type in spec.model_types:
        assert registry.spec_for_model_type(model_type) is spec, model_type
        if model_type in SIGLIP_TEXT_TOWERS:
            continue  # tested by test_siglip_text_towers_are_exact_at_every_position
        model, _ = loaded(model_type, CASES[model_type].head is not None, "packed")  # the stock one
        assert model.config.model_type == model_type
        report = bt_plugin.explain(model, kernel="packed")
        assert report.family == spec.name and report.reason is None, str(report)
        assert report.layers, str(report)
        modules = dict(model.named_modules())
        for layer_report in report.layers:
            layer = modules[layer_report.path]
            assert isinstance(layer, classes)
            layout = spec.for_layer(layer)  # the spec in this transformers version's layout
            roles = resolve_roles(layer, layout)  # raises on a path that does not resolve
            for role in ROLES + OPTIONAL_ROLES:
                assert (roles[role] is None) == (getattr(layout, role) is None), role
            assert structure_reason(layer, layout, roles) is None
            head_dim = roles["out_proj"].out_features // int(roles["num_heads"])
            # no scale role means the default: the attention module's own scale, if it has one, agrees
            attention = resolve_path(layer, layout.query.rpartition(".")[0])
            scale = roles["attention_scale"]
            scale = scale if scale is not None else getattr(attention, "scaling", getattr(attention, "scale", head_dim ** -0.5))
            assert float(scale) == pytest.approx(head_dim ** -0.5)
            # the layer checks pass exactly the vision layers
            checks = [check(layer) for check in spec.layer_checks]
            assert any(checks) == _falls_back(model_type, layer_report.path), (layer_report.path, checks)
