"""Rerankers: sentence-transformers' `CrossEncoder.predict` on (query, passage) pairs of real
paragraphs, converted zero-code (`BT_PLUGIN=1`, in a subprocess) and with `enabled()`, against a
stock CrossEncoder of the same checkpoint (all-MiniLM-L6-v2 with a seeded one-label head)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import bt_plugin
import support

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hf_offline")

ATOL = 1e-5
PAIRS = 64
BATCH = 16


@pytest.fixture(scope="module")
def reranker_dir(tmp_path_factory) -> str:
    return support.save_reranker(tmp_path_factory.mktemp("reranker"))


@pytest.fixture(scope="module")
def pairs() -> list[tuple[str, str]]:
    return support.paragraph_pairs(PAIRS)


@pytest.fixture(scope="module")
def stock_scores(reranker_dir, pairs) -> torch.Tensor:
    from sentence_transformers import CrossEncoder

    stock = CrossEncoder(reranker_dir, device="cpu")
    assert not bt_plugin.is_converted(stock.model)
    return stock.predict(pairs, batch_size=BATCH, convert_to_tensor=True, show_progress_bar=False)


def test_cross_encoder_predict_with_enabled(reranker_dir, pairs, stock_scores):
    from sentence_transformers import CrossEncoder

    with bt_plugin.enabled():
        fused = CrossEncoder(reranker_dir, device="cpu")
    assert bt_plugin.is_converted(fused.model), bt_plugin.explain(fused.model)
    masks: list[torch.Tensor] = []  # what the encoder received (CrossEncoder calls the head's forward directly)
    hook = fused.model.base_model.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True)
    try:
        scores = fused.predict(pairs, batch_size=BATCH, convert_to_tensor=True, show_progress_bar=False)
    finally:
        hook.remove()
    support.assert_ran_fused(fused.model)
    assert scores.shape == stock_scores.shape == (PAIRS,)
    assert (scores - stock_scores).abs().max().item() <= ATOL
    # the batches the model saw were padded (else the padding-free path would not be exercised)
    assert len(masks) == PAIRS // BATCH
    assert sum(int(m.sum()) for m in masks) < 0.9 * sum(m.numel() for m in masks)


def test_cross_encoder_predict_zero_code(reranker_dir, pairs, stock_scores, tmp_path):
    """BT_PLUGIN=1 and no bt_plugin import before the load: the CrossEncoder comes back converted."""
    (tmp_path / "pairs.json").write_text(json.dumps(pairs))
    script = f"""
import json, torch
from sentence_transformers import CrossEncoder
pairs = [tuple(p) for p in json.load(open({str(tmp_path / "pairs.json")!r}))]
model = CrossEncoder({reranker_dir!r}, device="cpu")
torch.save(model.predict(pairs, batch_size={BATCH}, convert_to_tensor=True, show_progress_bar=False),
           {str(tmp_path / "scores.pt")!r})
import bt_plugin.loading.report as report  # only to inspect, after the load
print(json.dumps([(l.converted, l.fused_calls, l.fallback_calls) for l in report.explain(model.model).layers]))
"""
    env = dict(os.environ, BT_PLUGIN="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout.strip().splitlines()[-1])
    assert layers and all(converted and fused > 0 and fallback == 0 for converted, fused, fallback in layers), layers
    scores = torch.load(tmp_path / "scores.pt")
    assert (scores - stock_scores).abs().max().item() <= ATOL
