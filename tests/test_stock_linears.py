"""A converted layer's own `nn.Linear` modules (bt_plugin.dispatch.stock_linears): where the layer runs
its stock code on a few tokens, a large weight is multiplied in pieces of its output rows (MKL's
few-row path is slow), equal to stock; every other call is `nn.Linear.forward`'s own; the modules
stay stock (class, parameters, state_dict) and `revert()` removes the routing. The thresholds are
lowered for these small models, as the fuzz tests lower them."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import transformers
from torch import nn

import bt_plugin
from bt_plugin.dispatch.stock_linears import FewRowsForward
from bt_plugin.kernels import linear

import support

ATOL = 1e-5
SIZES = dict(vocab_size=support.VOCAB, hidden_size=256, num_attention_heads=4, intermediate_size=512,
             num_hidden_layers=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=2, eos_token_id=3,
             cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2, local_attention=8)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def small_pieces(monkeypatch):
    """Every linear of the example model large enough, in pieces of 64 x 256 elements; counts the
    calls computed in pieces."""
    monkeypatch.setattr(linear, "SPLIT_MIN_WEIGHT", 0)
    monkeypatch.setattr(linear, "SPLIT_PIECE", 64 * 256)
    calls = []
    in_pieces = linear.in_pieces
    monkeypatch.setattr(linear, "in_pieces", lambda *a: calls.append(a[0].shape[0]) or in_pieces(*a))
    return calls


@pytest.fixture
def modernbert(small_pieces):
    """(stock, converted) ModernBERT: a family whose layers run their own code."""
    if not hasattr(transformers, "ModernBertModel"):
        pytest.skip("this transformers has no ModernBERT")
    return support.stock_and_converted(transformers.ModernBertModel, transformers.ModernBertConfig(**SIZES))


def _routed(model) -> list[nn.Linear]:
    return [m for m in model.modules() if isinstance(m.__dict__.get("forward"), FewRowsForward)]


def _last_hidden(model, ids, mask=None):
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


@pytest.mark.parametrize("length", [1, 4, 9, 15, 16, 40])
def test_a_few_unpadded_tokens_run_in_pieces_and_equal_stock(modernbert, small_pieces, length):
    stock, converted = modernbert
    ids, mask = support.padded_batch([length], pad_token=0)
    want, got = _last_hidden(stock, ids, mask), _last_hidden(converted, ids, mask)
    assert (want - got).abs().max().item() <= ATOL
    routed = _routed(converted)
    assert routed and all(type(m) is nn.Linear for m in routed)
    in_range = linear.SPLIT_ROWS[0] <= length <= linear.SPLIT_ROWS[1]
    assert (len(small_pieces) == len(routed)) if in_range else not small_pieces, (length, small_pieces)


def test_padded_batches_autograd_and_autocast_equal_stock(modernbert, small_pieces):
    stock, converted = modernbert
    ids, mask = support.padded_batch([7, 3, 5], pad_token=0)  # 15 real tokens packed: in pieces
    want, got = _last_hidden(stock, ids, mask), _last_hidden(converted, ids, mask)
    assert support.max_diff_on_real(want, got, mask) <= ATOL
    small_pieces.clear()
    one, one_mask = support.padded_batch([9], pad_token=0)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = stock(input_ids=one).last_hidden_state, converted(input_ids=one).last_hidden_state
    assert not small_pieces  # under autocast F.linear casts, as stock's does
    assert torch.equal(want, got)
    converted.train()
    try:
        got = converted(input_ids=one, attention_mask=one_mask).last_hidden_state
        got.sum().backward()  # with grad: nn.Linear's own path, gradients flow
    finally:
        converted.eval()
        converted.zero_grad(set_to_none=True)
    assert not small_pieces


def test_the_modules_stay_stock_through_copies_and_revert(modernbert):
    stock, converted = modernbert
    assert converted.state_dict().keys() == stock.state_dict().keys()
    ids, mask = support.padded_batch([9], pad_token=0)
    want = _last_hidden(stock, ids, mask)
    for clone in (copy.deepcopy(converted), pickle.loads(pickle.dumps(converted))):
        routed = _routed(clone)
        assert routed and all(m.forward.module is m for m in routed)  # bound to the copy's own modules
        assert (want - _last_hidden(clone, ids, mask)).abs().max().item() <= ATOL
    reverted = bt_plugin.revert(copy.deepcopy(converted))
    assert not _routed(reverted)
    assert all("forward" not in m.__dict__ for m in reverted.modules() if isinstance(m, nn.Linear))


def test_a_forward_already_set_on_a_linear_is_kept(small_pieces):
    if not hasattr(transformers, "ModernBertModel"):
        pytest.skip("this transformers has no ModernBERT")
    torch.manual_seed(0)
    model = transformers.ModernBertModel(transformers.ModernBertConfig(**SIZES)).eval()
    target = next(m for m in model.layers[0].modules() if type(m) is nn.Linear)
    calls = []
    own = lambda x: calls.append(1) or nn.Linear.forward(target, x)  # noqa: E731
    target.forward = own
    bt_plugin.convert(model)
    ids, _ = support.padded_batch([9], pad_token=0)
    _last_hidden(model, ids)
    assert target.__dict__["forward"] is own and calls == [1]
    bt_plugin.revert(model)
    assert target.__dict__["forward"] is own
