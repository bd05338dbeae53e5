"""Seq2seq families (patches/seq2seq.py): the ENCODER stack is fused, the decoder stays stock.

Each model type is built with its real defaults at realistic width (d_model 256, 4 heads, 2 encoder
and 2 decoder layers), saved once, and loaded twice through `from_pretrained`: stock, and inside
`bt_plugin.enabled(kernel=K)`. Encoder outputs are compared on real tokens (the fused path writes
zeros at padded positions); decoder outputs and logits are compared everywhere (cross-attention
masks padded encoder positions). Every comparison also checks through `explain()` that each encoder
layer ran fused for that call, and that no decoder layer was converted.
"""

from __future__ import annotations

import pytest
import torch
import transformers

import bt_plugin
from bt_plugin.loading import registry
from bt_plugin.dispatch.layer import FusedLayer
from bt_plugin.patches import seq2seq

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
VOCAB = 1000
ENCODER_LAYERS = 2
KERNELS = ["packed", "fastpath"]

# model_type -> (config class, base model class, generation head class, spec name)
FAMILIES = {
    "bart": ("BartConfig", "BartModel", "BartForConditionalGeneration", "bart"),
    "marian": ("MarianConfig", "MarianModel", "MarianMTModel", "bart"),
    "blenderbot-small": (
        "BlenderbotSmallConfig", "BlenderbotSmallModel", "BlenderbotSmallForConditionalGeneration", "bart",
    ),
    "plbart": ("PLBartConfig", "PLBartModel", "PLBartForConditionalGeneration", "bart"),
    "mbart": ("MBartConfig", "MBartModel", "MBartForConditionalGeneration", "mbart"),
    "m2m_100": ("M2M100Config", "M2M100Model", "M2M100ForConditionalGeneration", "mbart"),
    "pegasus": ("PegasusConfig", "PegasusModel", "PegasusForConditionalGeneration", "mbart"),
    "blenderbot": ("BlenderbotConfig", "BlenderbotModel", "BlenderbotForConditionalGeneration", "mbart"),
    "mvp": ("MvpConfig", "MvpModel", "MvpForConditionalGeneration", "mvp"),
}
MODEL_TYPES = list(FAMILIES)


def make_config(model_type: str, **overrides):
    """The family's defaults at realistic width (Marian's pad/decoder-start id 58100 moved into the
    small vocabulary)."""
    config_class = getattr(transformers, FAMILIES[model_type][0])
    values = dict(
        vocab_size=VOCAB, d_model=256, encoder_attention_heads=4, decoder_attention_heads=4,
        encoder_ffn_dim=1024, decoder_ffn_dim=1024, encoder_layers=ENCODER_LAYERS, decoder_layers=2,
        max_position_embeddings=64,
    )
    if model_type == "marian":
        values.update(pad_token_id=VOCAB - 1, decoder_start_token_id=VOCAB - 1)
    values.update(overrides)
    config = config_class(**values)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id", "decoder_start_token_id"):
        assert getattr(config, name, None) is None or getattr(config, name) < VOCAB, (model_type, name)
    return config


def model_class(model_type: str, head: bool):
    return getattr(transformers, FAMILIES[model_type][2 if head else 1])


# --------------------------------------------------------------------------------------------
# fixtures: each model saved once, stock loaded once, converted loaded once per kernel
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    cache: dict[tuple, str] = {}

    def get(model_type: str, head: bool, **overrides) -> str:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            torch.manual_seed(len(cache))
            model = model_class(model_type, head)(make_config(model_type, **overrides))
            directory = tmp_path_factory.mktemp(f"{model_type}-{'head' if head else 'base'}")
            model.save_pretrained(str(directory))
            cache[key] = str(directory)
        return cache[key]

    return get


@pytest.fixture(scope="module")
def pairs(saved):
    """`pairs(model_type, kernel, head=False, **overrides)` -> (stock, converted)."""
    stocks: dict[tuple, torch.nn.Module] = {}
    fused: dict[tuple, torch.nn.Module] = {}

    def get(model_type: str, kernel: str, head: bool = False, attn_implementation=None, **overrides):
        key = (model_type, head, attn_implementation, tuple(sorted(overrides.items())))
        path = saved(model_type, head, **overrides)
        cls = model_class(model_type, head)
        kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
        if key not in stocks:
            stocks[key] = cls.from_pretrained(path, **kwargs).eval()
            assert not bt_plugin.is_converted(stocks[key])
        if (key, kernel) not in fused:
            with bt_plugin.enabled(kernel=kernel):
                model = cls.from_pretrained(path, **kwargs).eval()
            _assert_converted(model, model_type, kernel)
            fused[(key, kernel)] = model
        return stocks[key], fused[(key, kernel)]

    return get


@pytest.fixture(params=KERNELS)
def kernel(request):
    return request.param


def _assert_converted(model, model_type: str, kernel: str) -> None:
    report = bt_plugin.explain(model)
    assert report.reason is None, str(report)
    assert report.family == FAMILIES[model_type][3]
    assert len(report.layers) == ENCODER_LAYERS, str(report)
    for layer in report.layers:
        assert layer.converted and layer.kernel == kernel, str(report)
        assert ".encoder.layers." in f".{layer.path}" and "decoder" not in layer.path, layer.path
    modules = dict(model.named_modules())
    fused_paths = {name for name, module in modules.items() if isinstance(module, FusedLayer)}
    assert fused_paths == {layer.path for layer in report.layers}
    assert not any("decoder" in name for name in fused_paths)


def _stats(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _run_both(stock, fused, call):
    """`call(model)` on both under inference_mode; every encoder layer ran fused, never fell back."""
    before = _stats(fused)
    with torch.inference_mode():
        expected = call(stock)
        actual = call(fused)
    report = bt_plugin.explain(fused)
    for (f0, b0), (f1, b1), layer in zip(before, _stats(fused), report.layers):
        assert f1 - f0 == 1, f"{layer.path} did not run fused exactly once:\n{report}"
        assert b1 == b0 == 0, f"{layer.path} fell back:\n{report}"
        assert layer.reason is None, layer.reason
    assert not bt_plugin.is_converted(stock)
    return expected, actual


def _diff(want: torch.Tensor, got: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    assert want.shape == got.shape
    if mask is not None:
        want, got = want[mask.bool()], got[mask.bool()]
    return (want - got).abs().max().item()


def _batch(model, lengths: list[int], seed: int):
    """Right-padded `(input_ids, attention_mask)` with the model's pad token."""
    generator = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.randint(5, VOCAB - 5, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
        ids[row, real:] = model.config.pad_token_id
    return ids, mask


def _decoder_ids(rows: int, seed: int, width: int = 5) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(5, VOCAB - 5, (rows, width), generator=generator)


# --------------------------------------------------------------------------------------------
# specs
# --------------------------------------------------------------------------------------------


def test_every_spec_resolves_its_layer_classes():
    for spec in seq2seq.SPECS:
        assert len(spec.resolve_layer_classes()) == len(spec.layer_classes), spec.name
        for model_type in spec.model_types:
            assert registry.spec_for_model_type(model_type) is spec, model_type
    # fsmt has its own module (tests/test_arch_fsmt.py): legacy layout and masks
    assert {t for spec in seq2seq.SPECS for t in spec.model_types} == set(MODEL_TYPES) | {"fsmt"}


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_every_path_resolves_on_a_real_model(model_type):
    from bt_plugin.spec import OPTIONAL_ROLES, ROLES, resolve_path

    spec = registry.spec_for_model_type(model_type)
    torch.manual_seed(0)
    config = make_config(model_type, d_model=64, encoder_ffn_dim=128, decoder_ffn_dim=128)
    model = model_class(model_type, head=False)(config)
    encoder_layer = model.get_encoder().layers[0]
    decoder_layer = model.get_decoder().layers[0]
    assert isinstance(encoder_layer, spec.resolve_layer_classes())
    assert not isinstance(decoder_layer, spec.resolve_layer_classes())
    for role in ROLES + OPTIONAL_ROLES:
        if getattr(spec, role) is not None:
            resolve_path(encoder_layer, getattr(spec, role))
    attention = resolve_path(encoder_layer, "self_attn")
    assert abs(attention.scaling - attention.head_dim ** -0.5) < 1e-12  # so no attention_scale
    assert spec.config_reason(config) is None


# --------------------------------------------------------------------------------------------
# base models: padded encoder batch, batch of one, hidden states, eager masks
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batch(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    ids, mask = _batch(stock, [7, 3, 1, 12, 5], seed=1)
    decoder_ids = _decoder_ids(len(ids), seed=2)

    def call(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)

    expected, actual = _run_both(stock, fused, call)
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state, mask) <= ATOL
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_batch_of_one(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    ids, mask = _batch(stock, [9], seed=3)
    decoder_ids = _decoder_ids(1, seed=4)
    expected, actual = _run_both(stock, fused, lambda m: m(input_ids=ids, decoder_input_ids=decoder_ids))
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state) <= ATOL
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel)
    ids, mask = _batch(stock, [6, 2, 9, 4], seed=5)
    decoder_ids = _decoder_ids(len(ids), seed=6)

    def call(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, output_hidden_states=True)

    expected, actual = _run_both(stock, fused, call)
    assert len(actual.encoder_hidden_states) == len(expected.encoder_hidden_states) == ENCODER_LAYERS + 1
    for index, (want, got) in enumerate(zip(expected.encoder_hidden_states, actual.encoder_hidden_states)):
        assert _diff(want, got, mask) <= ATOL, f"encoder_hidden_states[{index}]"
    for index, (want, got) in enumerate(zip(expected.decoder_hidden_states, actual.decoder_hidden_states)):
        assert _diff(want, got) <= ATOL, f"decoder_hidden_states[{index}]"
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state, mask) <= ATOL


@pytest.mark.parametrize("model_type", ["bart", "mbart"])
def test_eager_attention_float_mask(model_type, kernel, pairs):
    """Eager attention hands the layers a float additive mask: also a key-padding mask."""
    stock, fused = pairs(model_type, kernel, attn_implementation="eager")
    assert fused.config._attn_implementation == "eager"
    ids, mask = _batch(stock, [8, 2, 5], seed=7)
    decoder_ids = _decoder_ids(len(ids), seed=8)
    expected, actual = _run_both(
        stock, fused, lambda m: m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    )
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state, mask) <= ATOL
    assert _diff(expected.last_hidden_state, actual.last_hidden_state) <= ATOL


@pytest.mark.parametrize("model_type", ["bart", "mvp"])
def test_output_attentions_falls_back_exactly(model_type, saved):
    """A call the kernels cannot serve runs the stock forward, with the reason in explain().
    (MVP's encoder passes `output_attentions` to its layers as a keyword and reads `[1]`.)"""
    path = saved(model_type, True)
    cls = model_class(model_type, head=True)
    stock = cls.from_pretrained(path, attn_implementation="eager").eval()
    with bt_plugin.enabled(kernel="packed"):
        fused = cls.from_pretrained(path, attn_implementation="eager").eval()
    ids, mask = _batch(stock, [6, 2, 8], seed=15)
    inputs = dict(input_ids=ids, attention_mask=mask, decoder_input_ids=_decoder_ids(3, seed=16))
    with torch.inference_mode():
        expected = stock(**inputs, output_attentions=True)
        actual = fused(**inputs, output_attentions=True)
    report = bt_plugin.explain(fused)
    for layer in report.layers:
        assert (layer.fused_calls, layer.fallback_calls) == (0, 1), str(report)
        assert "output_attentions" in layer.reason, str(report)
    assert len(actual.encoder_attentions) == ENCODER_LAYERS
    for want, got in zip(expected.encoder_attentions, actual.encoder_attentions):
        assert torch.equal(want, got)
    assert torch.equal(expected.logits, actual.logits)


# --------------------------------------------------------------------------------------------
# generation heads: logits with padded encoder inputs, and generate()
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_task_head_logits(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel, head=True)
    assert type(fused) is model_class(model_type, head=True)
    ids, mask = _batch(stock, [8, 3, 1, 11], seed=9)
    decoder_ids = _decoder_ids(len(ids), seed=10, width=6)
    expected, actual = _run_both(
        stock, fused, lambda m: m(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    )
    assert actual.logits.shape == (len(ids), 6, expected.logits.shape[-1])
    assert _diff(expected.logits, actual.logits) <= ATOL
    assert _diff(expected.encoder_last_hidden_state, actual.encoder_last_hidden_state, mask) <= ATOL


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_generate_gives_stock_tokens(model_type, kernel, pairs):
    stock, fused = pairs(model_type, kernel, head=True)
    ids, mask = _batch(stock, [9, 4, 6], seed=11)

    def call(model):
        return model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False,
            max_new_tokens=5, min_new_tokens=5,  # min: no early eos from a random model
            output_scores=True, return_dict_in_generate=True,
        )

    expected, actual = _run_both(stock, fused, call)  # the encoder runs once per generate()
    assert torch.equal(expected.sequences, actual.sequences), f"{expected.sequences}\n{actual.sequences}"
    assert len(expected.scores) == len(actual.scores) == 5
    for want, got in zip(expected.scores, actual.scores):  # processed logits: -inf where suppressed
        assert torch.equal(torch.isfinite(want), torch.isfinite(got))
        assert _diff(want, got, torch.isfinite(want)) <= ATOL
    # the decoder ran stock: its layers are still the stock classes
    assert not any(isinstance(m, FusedLayer) for m in fused.get_decoder().modules())


# --------------------------------------------------------------------------------------------
# what fastpath cannot serve stays stock with a reason; packed serves it
# --------------------------------------------------------------------------------------------


def test_marian_swish_activation(saved):
    """Opus-MT checkpoints use `swish` (SiLU): packed computes it, fastpath leaves the layers stock."""
    path = saved("marian", True, activation_function="swish")
    cls = model_class("marian", head=True)
    stock = cls.from_pretrained(path).eval()
    ids, mask = _batch(stock, [7, 2, 5], seed=12)
    decoder_ids = _decoder_ids(len(ids), seed=13)

    def call(model):
        return model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)

    with bt_plugin.enabled(kernel="fastpath"):
        left = cls.from_pretrained(path).eval()
    assert not bt_plugin.is_converted(left)
    report = bt_plugin.explain(left, kernel="fastpath")
    assert len(report.layers) == ENCODER_LAYERS
    assert all(not layer.converted and "activation was silu" in layer.reason for layer in report.layers), str(report)

    with bt_plugin.enabled(kernel="packed"):
        fused = cls.from_pretrained(path).eval()
    _assert_converted(fused, "marian", "packed")
    expected, actual = _run_both(stock, fused, call)
    assert _diff(expected.logits, actual.logits) <= ATOL
    with torch.inference_mode():
        assert torch.equal(call(left).logits, expected.logits)


def test_mvp_prompts_stay_stock_with_reason(saved):
    path = saved("mvp", False, use_prompt=True, prompt_length=4, prompt_mid_dim=32)
    with bt_plugin.enabled():
        model = model_class("mvp", head=False).from_pretrained(path)
    assert not bt_plugin.is_converted(model)
    report = bt_plugin.explain(model)
    assert report.reason is not None and "use_prompt" in report.reason, str(report)


def test_decoder_only_causal_lm_stays_stock(tmp_path):
    """BartForCausalLM holds only decoder layers: nothing to convert, with the reason."""
    torch.manual_seed(0)
    transformers.BartForCausalLM(make_config("bart")).save_pretrained(str(tmp_path))
    with bt_plugin.enabled():
        model = transformers.BartForCausalLM.from_pretrained(str(tmp_path))
    assert not bt_plugin.is_converted(model)
    report = bt_plugin.explain(model)
    assert report.layers == [] and "BartEncoderLayer" in report.reason, str(report)
