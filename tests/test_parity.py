"""Numerical parity of converted models against stock transformers, for every supported family.

Each model is saved once (module scope) and loaded twice through `from_pretrained`: stock, and
inside `bt_plugin.enabled()`. Outputs are compared on real tokens only (the fused path writes
zeros at padded positions, stock leaves arbitrary values there). Parity alone cannot tell a
fused run from a silent fallback to the stock forward (which is exact), so every comparison
also checks through `bt_plugin.explain` that each encoder layer ran fused for that call.
"""

from __future__ import annotations

import pytest
import torch

import bt_plugin
from bt_plugin.dispatch.layer import FusedLayer

from support import ARCHITECTURES, make_config, max_diff_on_real, model_class, padded_batch, save_model

ATOL = 1e-5
NUM_LAYERS = 3
MODEL_TYPES = list(ARCHITECTURES)
KERNELS = ["fastpath", "packed"]


@pytest.fixture(scope="module", params=KERNELS)
def kernel(request):
    """Every parity test runs once per kernel."""
    return request.param


# --------------------------------------------------------------------------------------------
# fixtures and helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """`saved(model_type, head=False, **overrides)` -> directory; each model is saved once."""
    cache: dict[tuple, str] = {}

    def get(model_type: str, head: bool = False, **overrides) -> str:
        key = (model_type, head, tuple(sorted(overrides.items())))
        if key not in cache:
            name = f"{model_type}-{'head' if head else 'base'}-{len(cache)}"
            cache[key] = save_model(model_type, tmp_path_factory.mktemp(name), head=head, **overrides)
        return cache[key]

    return get


def _load(model_type: str, path: str, head: bool, convert: bool, kernel: str = "auto", **kwargs):
    cls = model_class(model_type, head)
    if convert:
        with bt_plugin.enabled(kernel=kernel):
            model = cls.from_pretrained(path, **kwargs)
    else:
        model = cls.from_pretrained(path, **kwargs)
    return model.eval()


def _layer_paths(model) -> list[str]:
    return [layer.path for layer in bt_plugin.explain(model).layers]


def _assert_stock(model) -> None:
    """A model loaded outside any enabled() scope: no fused class anywhere, explain says stock."""
    assert not bt_plugin.is_converted(model)
    assert not any(isinstance(m, FusedLayer) for m in model.modules())
    report = bt_plugin.explain(model)
    assert len(report.layers) == NUM_LAYERS
    assert not any(layer.converted for layer in report.layers)
    assert all(layer.fused_calls == 0 for layer in report.layers)


def _assert_converted(fused, stock, kernel: str) -> None:
    """Every encoder layer is a fused class that is still an instance of the stock layer class."""
    assert bt_plugin.is_converted(fused)
    report = bt_plugin.explain(fused)
    assert report.reason is None, report.reason
    assert report.family == "bert"
    assert len(report.layers) == NUM_LAYERS
    assert [layer.path for layer in report.layers] == _layer_paths(stock)
    stock_modules, fused_modules = dict(stock.named_modules()), dict(fused.named_modules())
    for layer_report in report.layers:
        assert layer_report.converted, str(report)
        assert layer_report.kernel == kernel
        stock_layer, fused_layer = stock_modules[layer_report.path], fused_modules[layer_report.path]
        stock_class = type(stock_layer)
        assert not isinstance(stock_layer, FusedLayer)
        assert isinstance(fused_layer, FusedLayer)
        assert isinstance(fused_layer, stock_class)
        assert type(fused_layer) is not stock_class


@pytest.fixture(scope="module")
def pairs(saved, kernel):
    """`pairs(model_type, head=False, **load_kwargs)` -> (stock, converted), loaded once each."""
    cache: dict[tuple, tuple] = {}

    def get(model_type: str, head: bool = False, **load_kwargs):
        key = (model_type, head, tuple(sorted(load_kwargs.items())))
        if key not in cache:
            path = saved(model_type, head)
            stock = _load(model_type, path, head, convert=False, **load_kwargs)
            fused = _load(model_type, path, head, convert=True, kernel=kernel, **load_kwargs)
            _assert_stock(stock)
            _assert_converted(fused, stock, kernel)
            cache[key] = (stock, fused)
        return cache[key]

    return get


def _stats(model) -> list[tuple[int, int]]:
    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def _run_both(stock, fused, *, earlier_fallbacks: bool = False, **inputs):
    """Run both models under inference_mode; assert every fused layer ran fused exactly once.

    Unless `earlier_fallbacks`, the converted model must never have fallen back at all.
    """
    before = _stats(fused)
    with torch.inference_mode():
        expected = stock(**inputs)
        actual = fused(**inputs)
    after = _stats(fused)
    report = bt_plugin.explain(fused)
    for (f0, b0), (f1, b1), layer in zip(before, after, report.layers):
        assert f1 - f0 == 1, f"{layer.path} did not run fused:\n{report}"
        assert b1 - b0 == 0, f"{layer.path} fell back:\n{report}"
        assert earlier_fallbacks or b1 == 0, f"{layer.path} fell back earlier:\n{report}"
        assert layer.reason is None, layer.reason
    # the stock model must stay stock: nothing counted, nothing converted
    _assert_stock(stock)
    return expected, actual


def _pad_id(model) -> int:
    pad = model.config.pad_token_id
    assert pad is not None
    return pad


def _assert_close(expected, actual, mask) -> None:
    diff = max_diff_on_real(expected, actual, mask)
    assert diff <= ATOL, f"max abs diff on real tokens {diff:.3g} > {ATOL}"


def _assert_padded_positions(expected, actual, mask) -> None:
    """Padding removed (zeros), unless the pooler reads position 0 and it is padding in some row:
    then padded rows are computed as stock. The pooler output equals stock either way."""
    if getattr(expected, "pooler_output", None) is not None:
        assert (expected.pooler_output - actual.pooler_output).abs().max().item() <= ATOL
    if bool(mask[:, 0].all()):
        _assert_padding_zero(actual.last_hidden_state, mask)
    else:
        _assert_close(expected.last_hidden_state, actual.last_hidden_state, torch.ones_like(mask))


def _assert_padding_zero(actual, mask) -> None:
    if mask is not None and not bool(mask.bool().all()):
        assert bool((actual[~mask.bool()] == 0).all()), "fused output is not zero at padded positions"


# --------------------------------------------------------------------------------------------
# conversion itself
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_enabled_scope_converts_and_stock_load_does_not(model_type, saved, kernel):
    path = saved(model_type)
    stock = _load(model_type, path, head=False, convert=False)
    fused = _load(model_type, path, head=False, convert=True, kernel=kernel)
    _assert_stock(stock)
    _assert_converted(fused, stock, kernel)
    # the same weights: state dicts agree key for key
    stock_state, fused_state = stock.state_dict(), fused.state_dict()
    assert stock_state.keys() == fused_state.keys()
    for key in stock_state:
        assert torch.equal(stock_state[key], fused_state[key]), key
    # nothing called yet
    assert all(layer.fused_calls == 0 and layer.fallback_calls == 0 for layer in bt_plugin.explain(fused).layers)


# --------------------------------------------------------------------------------------------
# base models
# --------------------------------------------------------------------------------------------

BATCHES = {
    # several lengths, including a row of length 1 and a full-width row
    "mixed_lengths": ([7, 3, 1, 12, 5], None),
    # the mask is wider than every row: every row ends in padding
    "all_rows_padded": ([4, 2, 6], 10),
    "single_row_full": ([9], None),
    "single_row_padded": ([5], 8),
    "single_token_rows": ([1, 1], 4),
    # several rows, nothing padded: the kernel takes the dense tensor
    "no_padding": ([6, 6, 6], None),
}


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_padded_batches(model_type, batch, pairs):
    stock, fused = pairs(model_type)
    lengths, width = BATCHES[batch]
    ids, mask = padded_batch(lengths, width, seed=len(lengths), pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    assert actual.last_hidden_state.shape == expected.last_hidden_state.shape
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    _assert_padding_zero(actual.last_hidden_state, mask)
    if getattr(expected, "pooler_output", None) is not None:
        _assert_close(expected.pooler_output, actual.pooler_output, None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_no_attention_mask(model_type, pairs):
    stock, fused = pairs(model_type)
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 1000, (3, 11), generator=generator)
    expected, actual = _run_both(stock, fused, input_ids=ids)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, None)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_output_hidden_states(model_type, pairs):
    stock, fused = pairs(model_type)
    ids, mask = padded_batch([6, 2, 9, 1], seed=5, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    assert expected.hidden_states is not None and actual.hidden_states is not None
    assert len(actual.hidden_states) == len(expected.hidden_states) == NUM_LAYERS + 1
    for index, (want, got) in enumerate(zip(expected.hidden_states, actual.hidden_states)):
        assert got.shape == want.shape, index
        diff = max_diff_on_real(want, got, mask)
        assert diff <= ATOL, f"hidden_states[{index}] differs by {diff:.3g}"
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    # the last recorded hidden state is the model output
    _assert_close(actual.hidden_states[-1], actual.last_hidden_state, mask)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_hidden_states_then_plain_call(model_type, pairs):
    """After a call that recorded hidden states, a plain call is still fused and exact."""
    stock, fused = pairs(model_type)
    ids, mask = padded_batch([5, 8, 2], seed=6, pad_token=_pad_id(stock))
    _run_both(stock, fused, input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_return_dict_false(model_type, pairs):
    stock, fused = pairs(model_type)
    ids, mask = padded_batch([4, 10, 1, 7], seed=7, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask, return_dict=False)
    assert isinstance(expected, tuple) and isinstance(actual, tuple)
    assert len(actual) == len(expected) >= 1
    for index, (want, got) in enumerate(zip(expected, actual)):
        assert type(got) is type(want), index
        if isinstance(want, torch.Tensor):
            assert got.shape == want.shape, index
            diff = max_diff_on_real(want, got, mask)
            assert diff <= ATOL, f"output[{index}] differs by {diff:.3g}"


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_inference_under_no_grad(model_type, pairs):
    """torch.no_grad() (not only inference_mode) also takes the fused path."""
    stock, fused = pairs(model_type)
    ids, mask = padded_batch([3, 6], seed=8, pad_token=_pad_id(stock))
    before = _stats(fused)
    with torch.no_grad():
        expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        actual = fused(input_ids=ids, attention_mask=mask).last_hidden_state
    after = _stats(fused)
    assert all(f1 - f0 == 1 and b1 == 0 for (f0, _), (f1, b1) in zip(before, after)), str(bt_plugin.explain(fused))
    _assert_close(expected, actual, mask)


# --------------------------------------------------------------------------------------------
# task heads
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_task_head(model_type, pairs):
    stock, fused = pairs(model_type, head=True)
    assert type(stock) is model_class(model_type, head=True)
    assert type(fused) is model_class(model_type, head=True)
    ids, mask = padded_batch([8, 3, 1, 11], seed=9, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    assert actual.logits.shape == expected.logits.shape
    # token-level heads (masked LM, token classification) compare on real tokens only
    _assert_close(expected.logits, actual.logits, mask if expected.logits.dim() == 3 else None)


# --------------------------------------------------------------------------------------------
# eager attention: a float additive mask
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", MODEL_TYPES)
def test_eager_attention(model_type, pairs):
    stock, fused = pairs(model_type, attn_implementation="eager")
    assert stock.config._attn_implementation == "eager"
    assert fused.config._attn_implementation == "eager"
    ids, mask = padded_batch([7, 3, 1, 12, 5], seed=10, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    _assert_padded_positions(expected, actual, mask)
    # and with no padding at all
    ids, mask = padded_batch([6, 6], seed=11, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)


def test_eager_attention_task_head_bert(pairs):
    stock, fused = pairs("bert", head=True, attn_implementation="eager")
    ids, mask = padded_batch([2, 9, 5], seed=12, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    _assert_close(expected.logits, actual.logits, None)


# --------------------------------------------------------------------------------------------
# calls the fused path cannot serve: stock forward, exact, and the reason is reported
# --------------------------------------------------------------------------------------------


def _run_fallback(stock, fused, reason_part: str, context, **inputs):
    """Run both models in `context`; every fused layer must fall back once with a matching reason."""
    before = _stats(fused)
    with context():
        expected = stock(**inputs)
        actual = fused(**inputs)
    after = _stats(fused)
    report = bt_plugin.explain(fused)
    for (f0, b0), (f1, b1), layer in zip(before, after, report.layers):
        assert f1 == f0, f"{layer.path} ran fused:\n{report}"
        assert b1 - b0 == 1, f"{layer.path} did not fall back:\n{report}"
        assert layer.reason is not None and reason_part in layer.reason, str(report)
        assert report.layers[0].status == "fallback"
    _assert_stock(stock)
    return expected, actual


def _fused_again(stock, fused) -> None:
    """After a fallback, an ordinary call runs fused again and clears the reason."""
    ids, mask = padded_batch([3, 7], seed=20, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, fused, earlier_fallbacks=True, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    assert all(layer.status == "fused" for layer in bt_plugin.explain(fused).layers)


def _fresh_pair(saved, model_type: str, kernel: str = "fastpath", **load_kwargs):
    """A pair of its own, so the shared pairs never see a fallback."""
    path = saved(model_type)
    stock = _load(model_type, path, head=False, convert=False, **load_kwargs)
    fused = _load(model_type, path, head=False, convert=True, kernel=kernel, **load_kwargs)
    _assert_stock(stock)
    _assert_converted(fused, stock, kernel)
    return stock, fused


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_left_padding_falls_back_exactly(model_type, saved):
    """fastpath needs right padding (nested tensors from a mask); it falls back exactly."""
    stock, fused = _fresh_pair(saved, model_type, kernel="fastpath")
    ids, mask = padded_batch([7, 3, 5], seed=15, pad_token=_pad_id(stock))
    ids, mask = ids.flip(1), mask.flip(1)  # left padded
    expected, actual = _run_fallback(
        stock, fused, "right-padded", torch.inference_mode, input_ids=ids, attention_mask=mask
    )
    assert torch.equal(expected.last_hidden_state, actual.last_hidden_state)
    _fused_again(stock, fused)


@pytest.mark.parametrize("model_type", ["bert", "electra"])
def test_grad_enabled_falls_back_exactly(model_type, saved):
    stock, fused = _fresh_pair(saved, model_type)
    ids, mask = padded_batch([4, 9], seed=16, pad_token=_pad_id(stock))
    expected, actual = _run_fallback(
        stock, fused, "grad", torch.enable_grad, input_ids=ids, attention_mask=mask
    )
    assert actual.last_hidden_state.requires_grad
    assert torch.equal(expected.last_hidden_state, actual.last_hidden_state)
    _fused_again(stock, fused)


def test_training_mode_falls_back(saved):
    stock, fused = _fresh_pair(saved, "bert")
    ids, mask = padded_batch([4, 9], seed=17, pad_token=_pad_id(stock))
    stock.train()
    fused.train()
    try:
        torch.manual_seed(0)
        with torch.no_grad():
            expected = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        before = _stats(fused)
        torch.manual_seed(0)
        with torch.no_grad():
            actual = fused(input_ids=ids, attention_mask=mask).last_hidden_state
        after = _stats(fused)
    finally:
        stock.eval()
        fused.eval()
    report = bt_plugin.explain(fused)
    assert all(f1 == f0 and b1 == b0 + 1 for (f0, b0), (f1, b1) in zip(before, after)), str(report)
    assert all("training mode" in layer.reason for layer in report.layers), str(report)
    assert torch.equal(expected, actual)  # same dropout draws: the stock forward ran
    _fused_again(stock, fused)


def test_output_attentions_falls_back_exactly(saved):
    stock, fused = _fresh_pair(saved, "bert", attn_implementation="eager")
    ids, mask = padded_batch([6, 2, 8], seed=18, pad_token=_pad_id(stock))
    expected, actual = _run_fallback(
        stock, fused, "output_attentions", torch.inference_mode,
        input_ids=ids, attention_mask=mask, output_attentions=True,
    )
    assert len(actual.attentions) == len(expected.attentions) == NUM_LAYERS
    for want, got in zip(expected.attentions, actual.attentions):
        assert torch.equal(want, got)
    assert torch.equal(expected.last_hidden_state, actual.last_hidden_state)
    _fused_again(stock, fused)


def test_row_without_real_tokens_falls_back(saved):
    stock, fused = _fresh_pair(saved, "bert", kernel="fastpath")
    ids, mask = padded_batch([5, 1, 8], seed=19, pad_token=_pad_id(stock))
    mask[1] = 0
    expected, actual = _run_fallback(
        stock, fused, "no real token", torch.inference_mode, input_ids=ids, attention_mask=mask
    )
    keep = mask.clone()
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, keep)
    _fused_again(stock, fused)


MASKS = {
    "left_padding": lambda mask: mask.flip(1),
    "gaps": lambda mask: mask * (torch.arange(mask.size(1)) % 3 != 1).long(),
    "row_without_real_tokens": lambda mask: torch.cat([mask[:1], torch.zeros_like(mask[:1]), mask[1:]]),
}


@pytest.mark.parametrize("case", list(MASKS))
@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_packed_serves_any_key_padding_mask(model_type, case, saved):
    """The packed kernel takes any key-padding mask: left padding, gaps, an empty row."""
    stock, fused = _fresh_pair(saved, model_type, kernel="packed")
    ids, mask = padded_batch([7, 3, 9, 1], seed=21, pad_token=_pad_id(stock))
    mask = MASKS[case](mask)
    ids = torch.cat([ids[:1], ids[:1], ids[1:]]) if case == "row_without_real_tokens" else ids
    if case == "row_without_real_tokens" and _additive_masks(stock):
        # transformers 4.x: stock attends uniformly to every key of an empty row (an additive
        # mask), which the pooler reads: the layers run stock, with the reason
        with torch.inference_mode():
            want, got = stock(input_ids=ids, attention_mask=mask), fused(input_ids=ids, attention_mask=mask)
        assert torch.equal(want.pooler_output, got.pooler_output)
        reasons = [layer.reason for layer in bt_plugin.explain(fused).layers]
        assert all("no real token under an additive mask" in reason for reason in reasons), reasons
        return
    expected, actual = _run_both(stock, fused, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    _assert_padded_positions(expected, actual, mask)


def _additive_masks(model) -> bool:
    """Whether the model hands its layers float additive masks (transformers 4.x) for padding."""
    seen = []
    layer = model.encoder.layer[0]
    handle = layer.register_forward_pre_hook(lambda module, args: seen.append(args[1] if len(args) > 1 else None))
    try:
        with torch.inference_mode():
            model(input_ids=torch.tensor([[5, 6], [5, 0]]), attention_mask=torch.tensor([[1, 1], [1, 0]]))
    finally:
        handle.remove()
    return isinstance(seen[0], torch.Tensor) and seen[0].is_floating_point()


# --------------------------------------------------------------------------------------------
# configurations that must stay stock
# --------------------------------------------------------------------------------------------


def test_decoder_config_stays_stock(saved):
    path = saved("bert", is_decoder=True)
    with bt_plugin.enabled():
        model = model_class("bert").from_pretrained(path)
    assert model.config.is_decoder
    assert not bt_plugin.is_converted(model)
    report = bt_plugin.explain(model)
    assert report.reason is not None and "is_decoder" in report.reason, str(report)
    assert "is_decoder" in str(report)
    assert not any(layer.converted for layer in report.layers)
    with pytest.raises(ValueError, match="is_decoder"):
        bt_plugin.convert(model)
    assert not bt_plugin.is_converted(model)
    # a failed convert leaves the model working exactly as stock
    stock = model_class("bert").from_pretrained(path).eval()
    model.eval()
    ids, mask = padded_batch([4, 6], seed=13, pad_token=_pad_id(stock))
    with torch.inference_mode():
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(want, got)


def test_stock_load_after_scope_is_stock(saved):
    """Loads after the enabled() block has closed are stock again."""
    path = saved("bert")
    with bt_plugin.enabled():
        inside = model_class("bert").from_pretrained(path)
    outside = model_class("bert").from_pretrained(path)
    assert bt_plugin.is_converted(inside)
    _assert_stock(outside)


# --------------------------------------------------------------------------------------------
# explicit convert / revert round trip on a loaded model
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_convert_revert_round_trip(model_type, saved, kernel):
    path = saved(model_type)
    stock = _load(model_type, path, head=False, convert=False)
    model = _load(model_type, path, head=False, convert=False)
    assert bt_plugin.convert(model, kernel=kernel) is model
    _assert_converted(model, stock, kernel)
    ids, mask = padded_batch([5, 1, 9], seed=14, pad_token=_pad_id(stock))
    expected, actual = _run_both(stock, model, input_ids=ids, attention_mask=mask)
    _assert_close(expected.last_hidden_state, actual.last_hidden_state, mask)
    bt_plugin.revert(model)
    _assert_stock(model)
    with torch.inference_mode():
        reverted = model(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(reverted, expected.last_hidden_state)
