"""Property-based: converted equals stock on real tokens, or falls back with a reason, for any input.

Hypothesis draws batch sizes, lengths, mask shapes, output options, kernels and architectures; the
reference is always stock transformers on the same weights.
"""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bt_plugin
from support import model_class, save_model

ATOL = 1e-5
MODEL_TYPES = ["bert", "roberta", "electra"]
KERNELS = ["packed", "fastpath"]
MASK_KINDS = ["right", "left", "gaps", "all_ones", "single_token_row", "empty_row", "all_rows_padded"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(model_type, kernel) -> (stock, converted), small but multi-head, positions up to 512."""
    built = {}
    for model_type in MODEL_TYPES:
        path = save_model(model_type, tmp_path_factory.mktemp(model_type), hidden_size=128,
                          num_attention_heads=4, intermediate_size=256, num_hidden_layers=2,
                          max_position_embeddings=512, **({"embedding_size": 64} if model_type == "electra" else {}))
        stock = model_class(model_type).from_pretrained(path).eval()
        for kernel in KERNELS:
            converted = bt_plugin.convert(model_class(model_type).from_pretrained(path).eval(), kernel=kernel)
            built[model_type, kernel] = (stock, converted)
    return built


def _mask(kind: str, lengths: list[int], width: int) -> torch.Tensor:
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
    if kind == "left":
        mask = mask.flip(1)
    elif kind == "gaps":
        mask[:, 1::3] = 0
        mask[:, 0] = 1
    elif kind == "all_ones":
        mask[:] = 1
    elif kind == "single_token_row":
        mask[0] = 0
        mask[0, 0] = 1
    elif kind == "empty_row":
        mask[-1] = 0
    elif kind == "all_rows_padded":
        mask[:, -1] = 0
        mask[:, 0] = 1
    return mask


@st.composite
def cases(draw):
    batch = draw(st.integers(1, 16))
    width = draw(st.integers(1, 300))
    lengths = draw(st.lists(st.integers(1, width), min_size=batch, max_size=batch))
    return dict(
        model_type=draw(st.sampled_from(MODEL_TYPES)),
        kernel=draw(st.sampled_from(KERNELS)),
        kind=draw(st.sampled_from(MASK_KINDS)),
        lengths=lengths,
        width=width,
        hidden_states=draw(st.booleans()),
        return_dict=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _last_and_hidden(output, return_dict: bool, hidden_states: bool):
    if return_dict:
        return output.last_hidden_state, (output.hidden_states if hidden_states else None)
    return output[0], (output[-1] if hidden_states else None)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=cases())
def test_converted_equals_stock_or_falls_back_with_reason(models, case):
    stock, converted = models[case["model_type"], case["kernel"]]
    mask = _mask(case["kind"], case["lengths"], case["width"])
    ids = torch.randint(5, 1000, mask.shape, generator=torch.Generator().manual_seed(case["seed"]))
    before = [(r.fused_calls, r.fallback_calls) for r in bt_plugin.explain(converted).layers]
    kwargs = dict(input_ids=ids, attention_mask=mask, output_hidden_states=case["hidden_states"],
                  return_dict=case["return_dict"])
    with torch.inference_mode():
        want = _last_and_hidden(stock(**kwargs), case["return_dict"], case["hidden_states"])
        got = _last_and_hidden(converted(**kwargs), case["return_dict"], case["hidden_states"])
    real = mask.bool()
    assert (want[0] - got[0])[real].abs().max().item() <= ATOL if real.any() else True
    if case["hidden_states"]:
        assert len(want[1]) == len(got[1])
        for w, g in zip(want[1], got[1]):
            assert real.sum() == 0 or (w - g)[real].abs().max().item() <= ATOL
    report = bt_plugin.explain(converted)
    for (fused0, fallback0), layer in zip(before, report.layers):
        if layer.fallback_calls > fallback0:  # a fallback must say why
            assert layer.reason, str(report)
        else:
            assert layer.fused_calls == fused0 + 1, str(report)
    if case["kernel"] == "packed":  # packed takes every mask drawn here
        assert all(layer.fallback_calls == f0 for (_, f0), layer in zip(before, report.layers)), str(report)
