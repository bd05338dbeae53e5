"""A converted model through its life: training, memory, saving, dtype/device moves, weight edits,
pickling, deep copies, revert, and conversion of a model built without from_pretrained.

Every check compares against stock transformers: a model loaded from the same saved directory
without the plugin (or a stock model that received the same treatment).
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import bt_plugin
from bt_plugin.dispatch.layer import FusedLayer
from support import make_config, max_diff_on_real, model_class, padded_batch, save_model

LENGTHS = [9, 16, 4, 13]  # right-padded batch, width 16
TOL = 1e-5


# ----------------------------------------------------------------------------- helpers


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    """BertForSequenceClassification, hidden 256 / 4 heads / 2 layers, dropout off (for training)."""
    return save_model(
        "bert", tmp_path_factory.mktemp("head"), head=True, seed=0, num_hidden_layers=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """BertModel, hidden 256 / 4 heads / 3 layers."""
    return save_model("bert", tmp_path_factory.mktemp("base"), seed=0, num_hidden_layers=3)


@pytest.fixture(scope="module")
def other_base_dir(tmp_path_factory):
    """Same architecture as base_dir, different random weights."""
    return save_model("bert", tmp_path_factory.mktemp("other"), seed=1, num_hidden_layers=3)


def load(directory, head=False, **kwargs):
    return model_class("bert", head).from_pretrained(directory, **kwargs).eval()


def load_converted(directory, head=False, kernel="auto", **kwargs):
    model = bt_plugin.convert(load(directory, head, **kwargs), kernel=kernel)
    assert bt_plugin.is_converted(model)
    return model


def hidden(model, ids, mask):
    """Last hidden state of the encoder (works for base and head models)."""
    base = getattr(model, "bert", model)
    with torch.inference_mode():
        return base(ids, attention_mask=mask).last_hidden_state


def calls(model) -> tuple[int, int]:
    """(fused_calls, fallback_calls) summed over the converted layers."""
    layers = bt_plugin.explain(model).layers
    return sum(r.fused_calls for r in layers), sum(r.fallback_calls for r in layers)


def reasons(model) -> list[str]:
    return [reason for r in bt_plugin.explain(model).layers for reason in r.fallback_reasons]


def assert_matches_stock(converted, stock, lengths=LENGTHS, tol=TOL, expect_fused=True):
    """Converted vs stock on a right-padded batch (real tokens only); optionally that it ran fused."""
    ids, mask = padded_batch(lengths, seed=3)
    fused_before, fallback_before = calls(converted)
    got, want = hidden(converted, ids, mask), hidden(stock, ids, mask)
    assert got.shape == want.shape and not got.is_nested
    diff = max_diff_on_real(got, want, mask)
    assert diff <= tol, f"converted differs from stock by {diff}"
    fused_after, fallback_after = calls(converted)
    if expect_fused:
        layers = len(bt_plugin.explain(converted).layers)
        assert fused_after - fused_before == layers, bt_plugin.explain(converted)
        assert fallback_after == fallback_before, bt_plugin.explain(converted)
    return got


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind all parameters and buffers."""
    seen: dict[int, int] = {}
    for tensor in list(model.parameters()) + list(model.buffers()):
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def assert_state_equal(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(sa[key], sb[key]), key


def assert_stock_classes(model: nn.Module, reference: nn.Module):
    classes = {name: type(m) for name, m in reference.named_modules()}
    got = {name: type(m) for name, m in model.named_modules()}
    assert got == classes
    assert not any(isinstance(m, FusedLayer) for m in model.modules())


def query_of(model, index=0):
    base = getattr(model, "bert", model)
    return base.encoder.layer[index].attention.self.query


# ----------------------------------------------------------------------------- training


def test_training_matches_stock_then_optimizer_step_then_fused_inference(head_dir):
    stock, conv = load(head_dir, head=True), load_converted(head_dir, head=True)
    stock.train()
    conv.train()
    ids, mask = padded_batch(LENGTHS, seed=1)
    labels = torch.tensor([0, 1, 1, 0])

    stock_loss = stock(ids, attention_mask=mask, labels=labels).loss
    conv_loss = conv(ids, attention_mask=mask, labels=labels).loss
    stock_loss.backward()
    conv_loss.backward()
    assert torch.allclose(conv_loss, stock_loss, atol=1e-6, rtol=0), (conv_loss.item(), stock_loss.item())

    stock_params, conv_params = dict(stock.named_parameters()), dict(conv.named_parameters())
    assert list(stock_params) == list(conv_params)
    for name, p in stock_params.items():
        q = conv_params[name]
        assert p.grad is not None and q.grad is not None, name
        assert q.grad.shape == p.grad.shape, name
        diff = (q.grad - p.grad).abs().max().item()
        assert diff <= 1e-6, f"grad of {name} differs by {diff}"

    fused, fallback = calls(conv)
    assert fused == 0 and fallback == 2
    assert all("training" in r for r in reasons(conv)), reasons(conv)
    assert all(r.reason and "training" in r.reason for r in bt_plugin.explain(conv).layers)

    query_before = query_of(conv).weight.detach().clone()
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01) for m in (stock, conv)]
    for optimizer in optimizers:
        optimizer.step()
    # The step really moved the fused q/k/v weights (else the comparison below proves nothing).
    assert not torch.equal(query_of(conv).weight, query_before)
    assert_state_equal(conv, stock)

    stock.eval()
    conv.eval()
    assert_matches_stock(conv, stock)


def test_training_sgd_step_on_fused_views(head_dir):
    """SGD with momentum writes every q/k/v update into the fused storage the kernel reads."""
    stock, conv = load(head_dir, head=True), load_converted(head_dir, head=True)
    assert_matches_stock(conv, stock)  # builds the fused cache before training
    ids, mask = padded_batch(LENGTHS, seed=2)
    labels = torch.tensor([1, 0, 1, 1])
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (stock, conv)]
    for _ in range(2):
        for model, optimizer in zip((stock, conv), optimizers):
            model.train()
            optimizer.zero_grad()
            model(ids, attention_mask=mask, labels=labels).loss.backward()
            optimizer.step()
    stock.eval()
    conv.eval()
    assert_matches_stock(conv, stock)


# ----------------------------------------------------------------------------- memory and state


def test_memory_and_state_dict_match_stock(base_dir):
    stock, conv = load(base_dir), load_converted(base_dir)
    assert_matches_stock(conv, stock)  # after a fused call too: the cache is no second copy
    stock_bytes, conv_bytes = storage_bytes(stock), storage_bytes(conv)
    assert abs(conv_bytes - stock_bytes) <= 0.01 * stock_bytes, (conv_bytes, stock_bytes)
    assert_state_equal(conv, stock)
    # q/k/v really are views into one [3E, E] storage per layer.
    for layer in conv.encoder.layer:
        attn = layer.attention.self
        ptrs = {p.untyped_storage().data_ptr() for p in (attn.query.weight, attn.key.weight, attn.value.weight)}
        assert len(ptrs) == 1


def test_save_pretrained_loads_in_stock_transformers(base_dir, tmp_path):
    original = load(base_dir)
    conv = load_converted(base_dir)
    assert_matches_stock(conv, original)
    conv.save_pretrained(str(tmp_path))
    reloaded = load(tmp_path)  # plugin disabled: stock transformers
    assert not bt_plugin.is_converted(reloaded)
    assert_stock_classes(reloaded, original)
    assert_state_equal(reloaded, original)
    ids, mask = padded_batch(LENGTHS)
    assert torch.equal(hidden(reloaded, ids, mask), hidden(original, ids, mask))


# ----------------------------------------------------------------------------- storage changes


def _to64_to32(model):
    return model.to(torch.float64).to(torch.float32)


def _half_float(model):
    return model.half().float()


def _inplace_query(model):
    with torch.no_grad():
        for index in (0, 2):
            attn = getattr(model, "bert", model).encoder.layer[index].attention.self
            attn.query.weight.mul_(1.5)
            attn.value.bias.add_(0.25)
    return model


CHANGES = {"to64_to32": _to64_to32, "half_float": _half_float, "inplace_query_edit": _inplace_query}


@pytest.mark.parametrize("change", sorted(CHANGES))
@pytest.mark.parametrize("called_before", [False, True], ids=["fresh", "after_call"])
def test_storage_change_keeps_matching_stock(base_dir, change, called_before):
    stock, conv = load(base_dir), load_converted(base_dir)
    if called_before:  # the fused q/k/v cache exists and must be noticed as stale
        assert_matches_stock(conv, stock)
    stock, conv = CHANGES[change](stock), CHANGES[change](conv)
    assert_state_equal(conv, stock)
    assert_matches_stock(conv, stock)
    assert storage_bytes(conv) == pytest.approx(storage_bytes(stock), rel=0.01)


def test_half_falls_back_with_dtype_reason_then_float_is_fused(base_dir):
    """fastpath serves float32 only on CPU: fp16 falls back with a dtype reason."""
    stock, conv = load(base_dir).half(), load_converted(base_dir, kernel="fastpath").half()
    ids, mask = padded_batch(LENGTHS)
    got, want = hidden(conv, ids, mask), hidden(stock, ids, mask)
    assert got.dtype == torch.float16
    assert max_diff_on_real(got.float(), want.float(), mask) <= 1e-3
    fused, fallback = calls(conv)
    assert fused == 0 and fallback == 3
    assert all("dtype" in r and "float16" in r for r in reasons(conv)), reasons(conv)
    stock, conv = stock.float(), conv.float()
    assert_matches_stock(conv, stock)


def test_half_runs_packed_and_matches_stock_half(base_dir):
    """The packed kernel runs the same torch ops as stock, so fp16 is served (and re-fused)."""
    stock, conv = load(base_dir).half(), load_converted(base_dir, kernel="packed").half()
    ids, mask = padded_batch(LENGTHS)
    got, want = hidden(conv, ids, mask), hidden(stock, ids, mask)
    assert got.dtype == torch.float16
    assert max_diff_on_real(got.float(), want.float(), mask) <= 1e-2
    fused, fallback = calls(conv)
    assert fused == 3 and fallback == 0
    stock, conv = stock.float(), conv.float()
    assert_matches_stock(conv, stock)


@pytest.mark.parametrize("assign", [False, True], ids=["copy", "assign"])
@pytest.mark.parametrize("called_before", [False, True], ids=["fresh", "after_call"])
def test_load_state_dict_of_other_weights(base_dir, other_base_dir, assign, called_before):
    first, other, conv = load(base_dir), load(other_base_dir), load_converted(base_dir)
    if called_before:
        assert_matches_stock(conv, first)
    state = {k: v.clone() for k, v in other.state_dict().items()}
    result = conv.load_state_dict(state, assign=assign)
    assert not result.missing_keys and not result.unexpected_keys
    assert_state_equal(conv, other)
    assert_matches_stock(conv, other)
    # The first model's weights are really gone (the comparison is not vacuous).
    ids, mask = padded_batch(LENGTHS)
    assert max_diff_on_real(hidden(conv, ids, mask), hidden(first, ids, mask), mask) > 1e-2


def test_inplace_edit_after_load_state_dict_assign(base_dir, other_base_dir):
    """assign=True installs new Parameters; later in-place edits must reach the kernel too."""
    other, conv = load(other_base_dir), load_converted(base_dir)
    conv.load_state_dict({k: v.clone() for k, v in other.state_dict().items()}, assign=True)
    assert_matches_stock(conv, other)
    _inplace_query(other)
    _inplace_query(conv)
    assert_matches_stock(conv, other)


# ----------------------------------------------------------------------------- copies


def _pickle(model):
    return pickle.loads(pickle.dumps(model))


COPIERS = {"pickle": _pickle, "deepcopy": copy.deepcopy}


@pytest.mark.parametrize("how", sorted(COPIERS))
@pytest.mark.parametrize("called_before", [False, True], ids=["fresh", "after_call"])
def test_copy_stays_converted_and_independent(base_dir, how, called_before):
    stock, conv = load(base_dir), load_converted(base_dir)
    if called_before:
        assert_matches_stock(conv, stock)
    clone = COPIERS[how](conv)
    assert clone is not conv
    assert bt_plugin.is_converted(clone)
    assert all(r.converted for r in bt_plugin.explain(clone).layers)
    assert_state_equal(clone, stock)
    assert_matches_stock(clone, stock)
    assert storage_bytes(clone) == pytest.approx(storage_bytes(stock), rel=0.01)

    # Independent of the original: editing the clone leaves the original matching stock.
    _inplace_query(clone)
    assert_matches_stock(conv, stock)
    edited_stock = _inplace_query(load(base_dir))
    assert_matches_stock(clone, edited_stock)

    bt_plugin.revert(clone)
    assert not bt_plugin.is_converted(clone)
    assert_stock_classes(clone, stock)
    ids, mask = padded_batch(LENGTHS)
    assert max_diff_on_real(hidden(clone, ids, mask), hidden(edited_stock, ids, mask), mask) <= TOL
    assert bt_plugin.is_converted(conv)


@pytest.mark.parametrize("how", sorted(COPIERS))
def test_copy_holds_no_weight_twice_before_first_call(base_dir, how):
    """'Nothing is held twice' must hold for a copy too, not only once a call has re-fused it."""
    stock, conv = load(base_dir), load_converted(base_dir)
    clone = COPIERS[how](conv)
    stock_bytes, clone_bytes = storage_bytes(stock), storage_bytes(clone)
    assert abs(clone_bytes - stock_bytes) <= 0.01 * stock_bytes, (clone_bytes, stock_bytes)


# ----------------------------------------------------------------------------- revert and convert


def test_revert_restores_stock_classes_and_parameter_objects(base_dir):
    never = load(base_dir)
    model = load(base_dir)
    ids_before = {name: id(p) for name, p in model.named_parameters()}
    modules_before = {name: id(m) for name, m in model.named_modules()}

    bt_plugin.convert(model)
    assert bt_plugin.is_converted(model)
    assert {name: id(p) for name, p in model.named_parameters()} == ids_before
    assert_matches_stock(model, never)

    assert bt_plugin.revert(model) is model
    assert not bt_plugin.is_converted(model)
    assert_stock_classes(model, never)
    assert {name: id(p) for name, p in model.named_parameters()} == ids_before
    assert {name: id(m) for name, m in model.named_modules()} == modules_before
    assert "_bt_plugin" not in model.__dict__
    for layer in model.encoder.layer:
        assert not any(k.startswith("_bt_") for k in layer.__dict__)
        attn = layer.attention.self
        ptrs = {p.untyped_storage().data_ptr() for p in (attn.query.weight, attn.key.weight, attn.value.weight)}
        assert len(ptrs) == 3  # q/k/v own their storage again
    assert_state_equal(model, never)
    assert storage_bytes(model) == pytest.approx(storage_bytes(never), rel=0.01)
    ids, mask = padded_batch(LENGTHS)
    assert torch.equal(hidden(model, ids, mask), hidden(never, ids, mask))
    bt_plugin.revert(model)  # reverting a stock model is harmless
    assert_stock_classes(model, never)

    bt_plugin.convert(model)  # and it converts again
    assert_matches_stock(model, never)


def test_convert_twice_is_a_noop(base_dir):
    stock, model = load(base_dir), load(base_dir)
    assert bt_plugin.convert(model) is model
    assert_matches_stock(model, stock)
    classes = [type(layer) for layer in model.encoder.layer]
    qkv = [layer.__dict__["_bt_qkv"][0] for layer in model.encoder.layer]
    before = bt_plugin.explain(model)

    assert bt_plugin.convert(model) is model
    assert [type(layer) for layer in model.encoder.layer] == classes
    for cls in classes:
        assert sum(issubclass(base, FusedLayer) and base is not FusedLayer for base in cls.__mro__) == 1
        assert cls.__mro__.count(FusedLayer) == 1
    after = bt_plugin.explain(model)
    assert [(r.fused_calls, r.fallback_calls) for r in after.layers] == [
        (r.fused_calls, r.fallback_calls) for r in before.layers
    ]
    assert all(layer.__dict__["_bt_qkv"][0] is t for layer, t in zip(model.encoder.layer, qkv))
    assert_matches_stock(model, stock)
    bt_plugin.revert(model)
    assert_stock_classes(model, stock)


def test_convert_model_built_from_config():
    config = make_config("bert", num_hidden_layers=2)
    torch.manual_seed(0)
    model = model_class("bert")(config).eval()
    stock = copy.deepcopy(model)
    assert bt_plugin.convert(model) is model
    assert bt_plugin.is_converted(model)
    assert_state_equal(model, stock)
    assert_matches_stock(model, stock)
