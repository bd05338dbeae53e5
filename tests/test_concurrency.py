"""One converted model used from many threads at once returns, per call, the single-threaded result."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import bt_plugin
from support import model_class, padded_batch, save_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_model("bert", tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("kernel", ["packed", "fastpath"])
def test_eight_threads_share_one_converted_model(model_dir, kernel):
    model = bt_plugin.convert(model_class("bert").from_pretrained(model_dir).eval(), kernel=kernel)
    stock = model_class("bert").from_pretrained(model_dir).eval()
    batches = [padded_batch([1 + (i * 7) % 23, 3 + i, 17 - i], seed=i, pad_token=0) for i in range(8)]
    with torch.inference_mode():
        alone = [model(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches]
        reference = [stock(input_ids=ids, attention_mask=mask).last_hidden_state for ids, mask in batches]
    start = threading.Barrier(8)

    def work(index: int):
        ids, mask = batches[index]
        start.wait()
        with torch.inference_mode():
            return [model(input_ids=ids, attention_mask=mask).last_hidden_state for _ in range(3)]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(work, range(8)))
    for index, outputs in enumerate(results):
        real = batches[index][1].bool()
        for out in outputs:
            assert torch.equal(out, alone[index])
            assert (out - reference[index])[real].abs().max().item() <= 1e-5
    report = bt_plugin.explain(model)
    assert all(layer.fallback_calls == 0 for layer in report.layers), str(report)


def test_a_forward_that_raises_half_way_leaves_no_state(model_dir):
    """The packed state lives in a per-call frame: an exception mid-stack must not leak into the next call."""
    model = bt_plugin.convert(model_class("bert").from_pretrained(model_dir).eval())
    stock = model_class("bert").from_pretrained(model_dir).eval()
    ids, mask = padded_batch([5, 2, 9], seed=1, pad_token=0)
    boom = model.encoder.layer[1].register_forward_pre_hook(lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with torch.inference_mode(), pytest.raises(RuntimeError, match="boom"):
        model(input_ids=ids, attention_mask=mask)
    boom.remove()
    with torch.inference_mode():
        got = model(input_ids=ids, attention_mask=mask).last_hidden_state
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (got - want)[mask.bool()].abs().max().item() <= 1e-5


def test_a_converted_model_called_inside_another_ones_forward(model_dir):
    """Two converted models, one called from inside the other's forward (before and after its layer loop)."""
    outer = bt_plugin.convert(model_class("bert").from_pretrained(model_dir).eval())
    inner = bt_plugin.convert(model_class("bert").from_pretrained(model_dir).eval())
    stock = model_class("bert").from_pretrained(model_dir).eval()
    ids, mask = padded_batch([6, 3], seed=2, pad_token=0)
    seen = []

    def call_inner(module, args):
        with torch.inference_mode():
            seen.append(inner(input_ids=ids, attention_mask=mask).last_hidden_state)

    # hooks on the embeddings and the pooler run inside the outer forward (a hook on a layer
    # would itself, rightly, make that layer run stock)
    handles = [outer.embeddings.register_forward_pre_hook(call_inner), outer.pooler.register_forward_pre_hook(call_inner)]
    with torch.inference_mode():
        got = outer(input_ids=ids, attention_mask=mask).last_hidden_state
        want = stock(input_ids=ids, attention_mask=mask).last_hidden_state
    for handle in handles:
        handle.remove()
    real = mask.bool()
    assert (got - want)[real].abs().max().item() <= 1e-5
    assert len(seen) == 2 and all((s - want)[real].abs().max().item() <= 1e-5 for s in seen)
    assert all(layer.fallback_calls == 0 for layer in bt_plugin.explain(outer).layers)


def test_enabled_scopes_are_isolated_between_asyncio_tasks(model_dir):
    async def load(scoped: bool, gate: asyncio.Event, other: asyncio.Event):
        if scoped:
            with bt_plugin.enabled():
                gate.set()
                await other.wait()
                return model_class("bert").from_pretrained(model_dir)
        await gate.wait()
        model = model_class("bert").from_pretrained(model_dir)
        other.set()
        return model

    async def main():
        gate, other = asyncio.Event(), asyncio.Event()
        return await asyncio.gather(load(True, gate, other), load(False, gate, other))

    inside, outside = asyncio.run(main())
    assert bt_plugin.is_converted(inside) and not bt_plugin.is_converted(outside)
