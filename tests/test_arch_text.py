"""Parity of the text families in `patches/text.py` against stock transformers, per model type.

Each model type is built from a realistic-width config with the family's real defaults (hidden
256, 4 heads, 3 layers; small vocabulary), saved once with `save_pretrained` (module scope) and
loaded twice with `from_pretrained`: stock, and inside `bt_plugin.enabled(kernel=...)`. Outputs
are compared on real tokens (fp32, max abs difference <= 1e-5). Parity cannot tell a fused run
from a silent fallback to the (exact) stock forward, so every fused comparison also checks
through `bt_plugin.explain` that each encoder layer ran fused for that call. Where a kernel
cannot serve a layer (fastpath and ALBERT's gelu_new), the model must stay stock and `explain`
must give the reason. `output_attentions=True` must run every layer's stock forward, with the
reason, and give stock's attentions (models loaded with eager attention for that test).

tapas, rembert, megatron-bert and visual_bert use the older call convention (the encoder passes
`output_attentions` to the layer, collects hidden states in its own loop, and the layer returns a
tuple); tapas gets its seven token-type columns, rembert an embedding size other than its hidden
size, and visual_bert runs text-only in the shared tests and with visual embeddings in its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.loading.conversion import plan
from bt_plugin.dispatch.eligibility import structure_reason
from bt_plugin.dispatch.layer import FusedLayer
from bt_plugin.patches import text
from bt_plugin.spec import OPTIONAL_ROLES, ROLES, resolve_path

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
VOCAB = 1000
KERNELS = ["packed", "fastpath"]

# the family sizes of a realistic-width model, and of a tiny one for the structural meta-test
REALISTIC = dict(hidden_size=256, num_attention_heads=4, intermediate_size=1024, num_hidden_layers=3)
TINY = dict(hidden_size=64, num_attention_heads=2, intermediate_size=128, num_hidden_layers=2)


@dataclass(frozen=True)
class Case:
    """One model type: config / base / task-head class names and what the test expects."""

    config: str
    base: str
    head: str | None
    family: str
    overrides: dict = field(default_factory=dict)
    calls_per_forward: int = 1  # fused calls per layer per forward (ALBERT shares one layer)
    layers: int | None = None  # layer reports in explain(); None: num_hidden_layers
    unserved: dict = field(default_factory=dict)  # kernel -> part of the reason it stays stock
    # how the reason a layer gives for a call with output_attentions=True starts: transformers'
    # recorders (attentions, and cross_attentions where the model has them), or (older encoders)
    # the argument the encoder passes to the layer


CASES = {
    "distilbert": Case("DistilBertConfig", "DistilBertModel", "DistilBertForSequenceClassification", "distilbert"),
    "albert": Case(
        "AlbertConfig", "AlbertModel", "AlbertForSequenceClassification", "albert",
        calls_per_forward=3, layers=1,
        unserved={"fastpath": "activation was gelu_tanh (fastpath computes gelu, relu)"},
    ),
    "bert-generation": Case("BertGenerationConfig", "BertGenerationEncoder", "BertGenerationDecoder", "bert_layout"),
    "dpr": Case("DPRConfig", "DPRQuestionEncoder", "DPRReader", "bert_layout"),
    "splinter": Case("SplinterConfig", "SplinterModel", "SplinterForQuestionAnswering", "bert_layout"),
    "layoutlm": Case("LayoutLMConfig", "LayoutLMModel", "LayoutLMForSequenceClassification", "bert_layout"),
    "markuplm": Case("MarkupLMConfig", "MarkupLMModel", "MarkupLMForSequenceClassification", "bert_layout"),
    "align_text_model": Case("AlignTextConfig", "AlignTextModel", None, "bert_layout"),
    "altclip_text_model": Case("AltCLIPTextConfig", "AltCLIPTextModel", None, "bert_layout"),
    "chinese_clip_text_model": Case("ChineseCLIPTextConfig", "ChineseCLIPTextModel", None, "bert_layout"),
    "clap_text_model": Case("ClapTextConfig", "ClapTextModel", "ClapTextModelWithProjection", "bert_layout"),
    "xlm-roberta-xl": Case(
        "XLMRobertaXLConfig", "XLMRobertaXLModel", "XLMRobertaXLForSequenceClassification", "xlm_roberta_xl"
    ),
    "roberta-prelayernorm": Case(
        "RobertaPreLayerNormConfig", "RobertaPreLayerNormModel", "RobertaPreLayerNormForSequenceClassification",
        "roberta_prelayernorm",
    ),
    "tapas": Case(
        "TapasConfig", "TapasModel", "TapasForSequenceClassification", "bert_legacy",
    ),
    "rembert": Case(
        "RemBertConfig", "RemBertModel", "RemBertForSequenceClassification", "bert_legacy",
        overrides=dict(input_embedding_size=128),  # embeddings narrower than the layers
    ),
    "visual_bert": Case(
        "VisualBertConfig", "VisualBertModel", "VisualBertForVisualReasoning", "bert_legacy",
        overrides=dict(visual_embedding_dim=96),
    ),
    "megatron-bert": Case(
        "MegatronBertConfig", "MegatronBertModel", "MegatronBertForSequenceClassification", "megatron_bert",
    ),
}
MODEL_TYPES = list(CASES)


def _config(model_type: str, sizes: dict = REALISTIC, **overrides):
    case = CASES[model_type]
    values = dict(vocab_size=VOCAB, max_position_embeddings=128, **sizes)
    values.update(case.overrides)
    values.update(overrides)
    return getattr(transformers, case.config)(**values)


def _class(model_type: str, head: bool):
    case = CASES[model_type]
    return getattr(transformers, case.head if head else case.base)


def _served(model_type: str, kernel: str) -> bool:
    return kernel not in CASES[model_type].unserved


# --------------------------------------------------------------------------------------------
# inputs: right-padded batches, with the extra inputs some families need
# --------------------------------------------------------------------------------------------


def _inputs(model_type: str, config, lengths: list[int], width: int | None = None, seed: int = 0) -> dict:
    """Right-padded `input_ids` / `attention_mask` plus valid family-specific inputs."""
    generator = torch.Generator().manual_seed(seed)
    batch, width = len(lengths), width or max(lengths)
    ids = torch.randint(5, VOCAB, (batch, width), generator=generator)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
        ids[row, real:] = config.pad_token_id
    inputs = {"input_ids": ids, "attention_mask": mask}
    if model_type == "splinter":  # a question token opens every row
        ids[:, 0] = config.question_token_id
    if model_type == "layoutlm":  # boxes (x0, y0, x1, y1) in 0..1000, zeros at padding
        corner = torch.randint(0, 900, (batch, width, 2), generator=generator)
        size = torch.randint(1, 100, (batch, width, 2), generator=generator)
        inputs["bbox"] = torch.cat([corner, corner + size], dim=-1) * mask[..., None]
    if model_type == "markuplm":  # xpath tag / subscript ids per depth, padded past each depth
        shape = (batch, width, config.max_depth)
        depth = torch.randint(1, 6, (batch, width, 1), generator=generator)
        level = torch.arange(config.max_depth)
        tags = torch.randint(0, config.tag_pad_id, shape, generator=generator)
        subs = torch.randint(0, 50, shape, generator=generator)
        inputs["xpath_tags_seq"] = torch.where(level < depth, tags, config.tag_pad_id)
        inputs["xpath_subs_seq"] = torch.where(level < depth, subs, config.subs_pad_id)
    if model_type == "tapas":  # 7 token-type columns (segment, column, row, ...), zeros at padding
        columns = [torch.randint(0, size, (batch, width), generator=generator) for size in config.type_vocab_sizes]
        inputs["token_type_ids"] = torch.stack(columns, dim=-1) * mask[..., None]
    return inputs


def _visual_inputs(config, lengths: list[int], visual_lengths: list[int], seed: int = 0) -> tuple[dict, torch.Tensor]:
    """visual_bert: text plus right-padded visual embeddings; returns the inputs and the mask
    over the concatenated sequence (text, then visual tokens) that its outputs are laid out on."""
    inputs = _inputs("visual_bert", config, lengths, seed=seed)
    generator = torch.Generator().manual_seed(seed + 100)
    batch, width = len(visual_lengths), max(visual_lengths)
    visual_mask = torch.zeros(batch, width, dtype=torch.long)
    for row, real in enumerate(visual_lengths):
        visual_mask[row, :real] = 1
    inputs["visual_embeds"] = torch.randn(batch, width, config.visual_embedding_dim, generator=generator)
    inputs["visual_attention_mask"] = visual_mask
    inputs["visual_token_type_ids"] = torch.ones(batch, width, dtype=torch.long)
    return inputs, torch.cat([inputs["attention_mask"], visual_mask], dim=1)


# --------------------------------------------------------------------------------------------
# models: saved once, loaded stock and converted
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(model_type, head=False, **overrides)` -> directory; each model is saved once."""
    cache: dict[tuple, str] = {}

    def get(model_type: str, head: bool = False, **overrides) -> str:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            directory = tmp_path_factory.mktemp(f"{model_type}-{'head' if head else 'base'}")
            torch.manual_seed(0)
            _class(model_type, head)(_config(model_type, **overrides)).save_pretrained(str(directory))
            cache[key] = str(directory)
        return cache[key]

    return get


def _load(model_type: str, path: str, head: bool, kernel: str | None, **kwargs):
    cls = _class(model_type, head)
    if kernel is None:
        return cls.from_pretrained(path, **kwargs).eval()
    with bt_plugin.enabled(kernel=kernel):
        return cls.from_pretrained(path, **kwargs).eval()


def _num_layers(model_type: str) -> int:
    return CASES[model_type].layers or REALISTIC["num_hidden_layers"]


def _assert_stock(model, model_type: str) -> None:
    assert not bt_plugin.is_converted(model)
    assert not any(isinstance(m, FusedLayer) for m in model.modules())
    report = bt_plugin.explain(model)
    assert len(report.layers) == _num_layers(model_type), str(report)
    assert all(not layer.converted and layer.fused_calls == 0 for layer in report.layers), str(report)


def _assert_converted(model, model_type: str, kernel: str) -> None:
    report = bt_plugin.explain(model)
    assert bt_plugin.is_converted(model)
    assert report.reason is None, report.reason
    assert report.family == CASES[model_type].family
    assert len(report.layers) == _num_layers(model_type), str(report)
    modules = dict(model.named_modules())
    for layer in report.layers:
        assert layer.converted and layer.kernel == kernel, str(report)
        assert isinstance(modules[layer.path], FusedLayer)


def _assert_unserved(model, model_type: str, kernel: str) -> None:
    """The kernel cannot serve this layer: the model stays stock and explain says why."""
    _assert_stock(model, model_type)
    expected = CASES[model_type].unserved[kernel]
    report = bt_plugin.explain(model, kernel=kernel)
    assert report.layers and all(expected in (layer.reason or "") for layer in report.layers), str(report)
    with pytest.raises(ValueError, match="activation was"):
        bt_plugin.convert(model, kernel=kernel)


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request):
    return request.param


@pytest.fixture(scope="module")
def pairs(saved, kernel):
    """`pairs(model_type, head=False)` -> (stock, loaded inside enabled(kernel)), loaded once each."""
    cache: dict[tuple, tuple] = {}

    def get(model_type: str, head: bool = False):
        key = (model_type, head)
        if key not in cache:
            path = saved(model_type, head)
            stock = _load(model_type, path, head, None)
            candidate = _load(model_type, path, head, kernel)
            _assert_stock(stock, model_type)
            if _served(model_type, kernel):
                _assert_converted(candidate, model_type, kernel)
            else:
                _assert_unserved(candidate, model_type, kernel)
            cache[key] = (stock, candidate)
        return cache[key]

    return get


def _stats(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _run_both(model_type: str, stock, candidate, served: bool, **inputs):
    """Both models under inference_mode; a served model's every layer must have run fused."""
    before = _stats(candidate)
    with torch.inference_mode():
        expected = stock(**inputs)
        actual = candidate(**inputs)
    after = _stats(candidate)
    report = bt_plugin.explain(candidate)
    calls = CASES[model_type].calls_per_forward if served else 0
    for (f0, _), (f1, b1), layer in zip(before, after, report.layers):
        assert f1 - f0 == calls, f"{layer.path} ran fused {f1 - f0} times, expected {calls}:\n{report}"
        assert b1 == 0, f"{layer.path} fell back:\n{report}"
        if served:
            assert layer.reason is None, layer.reason
    _assert_stock(stock, model_type)
    return expected, actual


def _close(name: str, want, got, mask: torch.Tensor) -> None:
    """Compare on real tokens where the tensor is per token (leading dims (B, L)), else everywhere."""
    assert got.shape == want.shape, name
    if want.dim() >= 2 and tuple(want.shape[:2]) == tuple(mask.shape):
        real = mask.bool()
        want, got = want[real], got[real]
    diff = (want - got).abs().max().item() if want.numel() else 0.0
    assert diff <= ATOL, f"{name}: max abs diff on real tokens {diff:.3g} > {ATOL}"


def _assert_outputs_close(expected, actual, mask: torch.Tensor) -> int:
    """Every tensor (and tuple of tensors) of the output agrees; returns how many were compared."""
    compared = 0
    assert list(expected.keys()) == list(actual.keys())
    for name, want in expected.items():
        got = actual[name]
        if isinstance(want, torch.Tensor):
            _close(name, want, got, mask)
            compared += 1
        elif isinstance(want, tuple):
            assert isinstance(got, tuple) and len(got) == len(want), name
            for index, (w, g) in enumerate(zip(want, got)):
                _close(f"{name}[{index}]", w, g, mask)
                compared += 1
    assert compared, "nothing was compared"
    return compared


# --------------------------------------------------------------------------------------------
# parity
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_conversion_keeps_weights(model_type, pairs, kernel):
    stock, candidate = pairs(model_type)
    stock_state, state = stock.state_dict(), candidate.state_dict()
    assert stock_state.keys() == state.keys()
    assert all(torch.equal(stock_state[key], state[key]) for key in stock_state)
    if _served(model_type, kernel):
        assert all(layer.fused_calls == 0 and layer.fallback_calls == 0 for layer in bt_plugin.explain(candidate).layers)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batch(model_type, pairs, kernel):
    """Several lengths, a length-1 row, a full row, every row ending in padding."""
    stock, candidate = pairs(model_type)
    served = _served(model_type, kernel)
    for lengths, width in (([7, 3, 1, 12, 5], None), ([4, 1, 6], 9)):
        inputs = _inputs(model_type, stock.config, lengths, width, seed=len(lengths))
        expected, actual = _run_both(model_type, stock, candidate, served, **inputs)
        _assert_outputs_close(expected, actual, inputs["attention_mask"])
        if served and "last_hidden_state" in actual:  # the fused path writes zeros at padding
            padded = ~inputs["attention_mask"].bool()
            assert bool((actual.last_hidden_state[padded] == 0).all())


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_of_one(model_type, pairs, kernel):
    stock, candidate = pairs(model_type)
    served = _served(model_type, kernel)
    for lengths, width in (([9], None), ([5], 8), ([1], None)):
        inputs = _inputs(model_type, stock.config, lengths, width, seed=20 + lengths[0])
        expected, actual = _run_both(model_type, stock, candidate, served, **inputs)
        _assert_outputs_close(expected, actual, inputs["attention_mask"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states(model_type, pairs, kernel):
    stock, candidate = pairs(model_type)
    inputs = _inputs(model_type, stock.config, [6, 2, 9, 1], seed=5)
    expected, actual = _run_both(
        model_type, stock, candidate, _served(model_type, kernel), output_hidden_states=True, **inputs
    )
    assert expected.hidden_states is not None and actual.hidden_states is not None
    assert len(actual.hidden_states) == len(expected.hidden_states) == REALISTIC["num_hidden_layers"] + 1
    for index, (want, got) in enumerate(zip(expected.hidden_states, actual.hidden_states)):
        _close(f"hidden_states[{index}]", want, got, inputs["attention_mask"])
    _assert_outputs_close(expected, actual, inputs["attention_mask"])
    # a plain call afterwards is fused (and exact) again
    expected, actual = _run_both(model_type, stock, candidate, _served(model_type, kernel), **inputs)
    _assert_outputs_close(expected, actual, inputs["attention_mask"])


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_attentions_falls_back_exactly(model_type, saved, kernel):
    """output_attentions=True: every layer runs its stock forward (with the reason) and the
    attentions are stock's; the next plain call is fused again."""
    path = saved(model_type)
    stock = _load(model_type, path, False, None, attn_implementation="eager")
    candidate = _load(model_type, path, False, kernel, attn_implementation="eager")
    served = _served(model_type, kernel)
    if served:
        _assert_converted(candidate, model_type, kernel)
    else:
        _assert_unserved(candidate, model_type, kernel)
    inputs = _inputs(model_type, stock.config, [6, 2, 9, 1], seed=6)
    before = _stats(candidate)
    with torch.inference_mode():
        expected = stock(output_attentions=True, **inputs)
        actual = candidate(output_attentions=True, **inputs)
    report = bt_plugin.explain(candidate)
    calls = CASES[model_type].calls_per_forward if served else 0
    for (f0, b0), (f1, b1), layer in zip(before, _stats(candidate), report.layers):
        assert f1 == f0 and b1 - b0 == calls, f"{layer.path}: fused {f1 - f0}, fell back {b1 - b0}:\n{report}"
        if served:
            assert layer.reason.startswith("the call recorded attentions"), str(report)
    assert expected.attentions is not None and actual.attentions is not None
    assert len(actual.attentions) == len(expected.attentions) == REALISTIC["num_hidden_layers"]
    for index, (want, got) in enumerate(zip(expected.attentions, actual.attentions)):
        assert torch.equal(want, got), f"attentions[{index}] differ"
    for name, want in expected.items():  # the stock forward ran: bit for bit
        if isinstance(want, torch.Tensor):
            assert torch.equal(want, actual[name]), name
    # a plain call afterwards is fused (and exact) again
    before = _stats(candidate)
    with torch.inference_mode():
        expected, actual = stock(**inputs), candidate(**inputs)
    report = bt_plugin.explain(candidate)
    for (f0, b0), (f1, b1), layer in zip(before, _stats(candidate), report.layers):
        assert f1 - f0 == calls and b1 == b0, str(report)
        assert layer.reason is None or not served, str(report)
    _assert_outputs_close(expected, actual, inputs["attention_mask"])


@pytest.mark.parametrize("model_type", [t for t in MODEL_TYPES if CASES[t].head])
def test_task_head(model_type, pairs, kernel):
    stock, candidate = pairs(model_type, head=True)
    assert type(stock) is type(candidate) is _class(model_type, head=True)
    inputs = _inputs(model_type, stock.config, [8, 3, 1, 11], seed=9)
    served = _served(model_type, kernel)
    reads = bt_plugin.explain(candidate).padded_positions or ""
    if served and reads.startswith("computed as stock") and kernel == "fastpath":
        # a head reading every position (span scores of QA readers): fastpath drops padded rows
        with torch.inference_mode():
            _assert_outputs_close(stock(**inputs), candidate(**inputs), torch.ones_like(inputs["attention_mask"]))
        assert all("reads every position" in layer.reason for layer in bt_plugin.explain(candidate).layers)
        return
    expected, actual = _run_both(model_type, stock, candidate, served, **inputs)
    assert any(name.endswith("logits") or name.endswith("embeds") for name in actual.keys())
    # such heads see stock values at every position, padded ones included
    mask = torch.ones_like(inputs["attention_mask"]) if reads.startswith("computed as stock") else inputs["attention_mask"]
    _assert_outputs_close(expected, actual, mask)


@pytest.mark.parametrize("model_type", ["distilbert", "xlm-roberta-xl", "chinese_clip_text_model"])
def test_eager_attention_float_mask(model_type, saved):
    """attn_implementation="eager" passes a float additive mask: still fused and exact."""
    path = saved(model_type)
    stock = _load(model_type, path, False, None, attn_implementation="eager")
    candidate = _load(model_type, path, False, "packed", attn_implementation="eager")
    assert candidate.config._attn_implementation == "eager"
    _assert_converted(candidate, model_type, "packed")
    inputs = _inputs(model_type, stock.config, [7, 3, 1, 12, 5], seed=10)
    expected, actual = _run_both(model_type, stock, candidate, True, **inputs)
    _assert_outputs_close(expected, actual, inputs["attention_mask"])


@pytest.mark.parametrize("groups, inner, layers", [(2, 2, 4), (1, 2, 3)])
def test_albert_layer_groups(groups, inner, layers, saved):
    """ALBERT with several layer groups and several layers per group (each group a stack)."""
    path = saved("albert", num_hidden_groups=groups, inner_group_num=inner, num_hidden_layers=layers)
    stock = _load("albert", path, False, None)
    candidate = _load("albert", path, False, "packed")
    report = bt_plugin.explain(candidate)
    assert report.reason is None and len(report.layers) == groups * inner, str(report)
    assert all(layer.converted for layer in report.layers), str(report)
    inputs = _inputs("albert", stock.config, [6, 2, 9, 1], seed=4)
    for output_hidden_states in (False, True):
        before = _stats(candidate)
        with torch.inference_mode():
            expected = stock(output_hidden_states=output_hidden_states, **inputs)
            actual = candidate(output_hidden_states=output_hidden_states, **inputs)
        calls = layers // groups  # each group runs num_hidden_layers / num_hidden_groups times
        for (f0, _), (f1, b1) in zip(before, _stats(candidate)):
            assert f1 - f0 == calls and b1 == 0, str(bt_plugin.explain(candidate))
        _assert_outputs_close(expected, actual, inputs["attention_mask"])


@pytest.mark.parametrize("head", [False, True], ids=["base", "head"])
def test_visual_bert_with_visual_embeddings(head, saved, kernel):
    """visual_bert with visual embeddings: text, then visual tokens, each part right-padded.

    Padded text in front of visual tokens leaves gaps in the key-padding mask: packed serves
    them, fastpath (right padding only) runs the stock forward and says why. With full-length
    text rows the combined mask is right-padded and fastpath serves it too.
    """
    path = saved("visual_bert", head)
    stock = _load("visual_bert", path, head, None)
    candidate = _load("visual_bert", path, head, kernel)
    _assert_converted(candidate, "visual_bert", kernel)
    # (text lengths, visual lengths): full text rows (right-padded overall), then padded text
    for seed, (lengths, visual_lengths) in enumerate([([5, 5, 5], [3, 1, 4]), ([7, 3, 1, 6], [2, 4, 1, 3])]):
        inputs, mask = _visual_inputs(stock.config, lengths, visual_lengths, seed=30 + seed)
        gaps = len(set(lengths)) > 1
        for extra in ({}, {"output_hidden_states": True}):
            if gaps and kernel == "fastpath":
                before = _stats(candidate)
                with torch.inference_mode():
                    expected, actual = stock(**inputs, **extra), candidate(**inputs, **extra)
                report = bt_plugin.explain(candidate)
                for (f0, b0), (f1, b1), layer in zip(before, _stats(candidate), report.layers):
                    assert f1 == f0 and b1 - b0 == 1, str(report)
                    assert "attention mask was not right-padded" in layer.reason, str(report)
            else:
                expected, actual = _run_both("visual_bert", stock, candidate, True, **inputs, **extra)
            if extra:
                assert len(actual.hidden_states) == len(expected.hidden_states) == REALISTIC["num_hidden_layers"] + 1
            assert actual[0].shape[1] == mask.shape[1] or head  # text + visual tokens
            _assert_outputs_close(expected, actual, mask)


# --------------------------------------------------------------------------------------------
# configurations that change the math stay stock, with the reason
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert-generation", "tapas", "rembert", "megatron-bert"])
def test_decoder_config_stays_stock(model_type, saved):
    path = saved(model_type, is_decoder=True)
    stock = _load(model_type, path, False, None)
    candidate = _load(model_type, path, False, "packed")
    assert not bt_plugin.is_converted(candidate)
    assert not any(isinstance(m, FusedLayer) for m in candidate.modules())
    report = bt_plugin.explain(candidate)
    assert report.reason == "config.is_decoder was True (only encoder self-attention is fused)", str(report)
    with pytest.raises(ValueError, match="is_decoder"):
        bt_plugin.convert(candidate)
    # and it runs exactly as stock (causal self-attention where the model makes it so)
    inputs = _inputs(model_type, stock.config, [5, 2, 7], seed=3)
    with torch.inference_mode():
        expected, actual = stock(**inputs), candidate(**inputs)
    assert torch.equal(expected.last_hidden_state, actual.last_hidden_state)


@pytest.mark.parametrize(
    "model_type",
    ["bert-generation", "dpr", "xlm-roberta-xl", "roberta-prelayernorm", "tapas", "rembert", "megatron-bert"],
)
@pytest.mark.parametrize("flag", ["is_decoder", "add_cross_attention"])
def test_decoder_flags_give_a_reason(model_type, flag):
    """Families whose layers honour is_decoder / add_cross_attention refuse those configs."""
    spec = registry.spec_for_model_type(model_type)
    assert spec.config_reason(_config(model_type, TINY)) is None
    reason = spec.config_reason(_config(model_type, TINY, **{flag: True}))
    assert reason == f"config.{flag} was True (only encoder self-attention is fused)"


# model types examined and left out of patches/text.py (see its docstring for the reasons)
REJECTED = (
    "flava_text_model", "canine", "big_bird",
    "ibert", "xmod", "layoutlmv2", "layoutlmv3", "lilt", "bros", "luke",
    "convbert", "mobilebert", "squeezebert", "funnel", "longformer", "nystromformer", "yoso", "mra",
    "ultrabert",
    "bridgetower_text_model", "xlm", "flaubert",
)


@pytest.mark.parametrize("model_type", REJECTED)
def test_rejected_model_types_are_not_registered(model_type):
    assert registry.spec_for_model_type(model_type) is None


# --------------------------------------------------------------------------------------------
# the specs themselves
# --------------------------------------------------------------------------------------------


def test_every_spec_is_registered_and_every_model_type_is_tested():
    specs = registry.all_specs()
    for spec in text.SPECS:
        assert specs[spec.name] is spec, f"{spec.name} is not registered through the entry point"
        for model_type in spec.model_types:
            assert registry.spec_for_model_type(model_type) is spec, model_type
            assert model_type in CASES, f"{model_type} has no parity test"
            assert CASES[model_type].family == spec.name
    names = [spec.name for spec in text.SPECS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("spec", text.SPECS, ids=lambda spec: spec.name)
def test_spec_resolves_every_layer_class(spec):
    classes = spec.resolve_layer_classes()
    assert len(classes) == len(spec.layer_classes), spec.layer_classes
    assert len(set(classes)) == len(classes)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_spec_paths_resolve_on_a_real_model(model_type):
    """Every role path of the spec resolves on every encoder layer of a small real model."""
    torch.manual_seed(0)
    model = _class(model_type, head=False)(_config(model_type, TINY)).eval()
    result = plan(model, "packed")
    assert result.reason is None, result.reason
    spec = result.spec
    assert spec.name == CASES[model_type].family
    assert result.layers
    for planned in result.layers:
        assert isinstance(planned.layer, spec.resolve_layer_classes())
        for role in ROLES + OPTIONAL_ROLES:
            path = getattr(spec, role)
            if path is not None:
                resolve_path(planned.layer, path)
        assert structure_reason(planned.layer, spec) is None
        assert planned.reason is None, planned.reason


def test_every_layer_class_is_exercised():
    """Each layer class named by a spec is the layer of at least one tested model type."""
    seen: set[type] = set()
    for model_type in MODEL_TYPES:
        torch.manual_seed(0)
        model = _class(model_type, head=False)(_config(model_type, TINY))
        seen.update(type(planned.layer) for planned in plan(model, "packed").layers)
    for spec in text.SPECS:
        missing = set(spec.resolve_layer_classes()) - seen
        assert not missing, f"{spec.name}: {sorted(c.__name__ for c in missing)} never built by a test"
