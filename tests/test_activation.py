"""Activation: enable()/disable(), enabled() scopes (per thread / asyncio task), per-call opt-out,
kernel-name checks, unsupported models and the load log line, against real transformers loads."""

from __future__ import annotations

import asyncio
import logging
import threading

import pytest
import torch
import transformers
import wrapt
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    BertModel,
    GPT2Config,
    GPT2Model,
    pipeline,
)
from transformers.modeling_utils import PreTrainedModel
from transformers.models.bert.modeling_bert import BertLayer

import bt_plugin
from bt_plugin import kernels
from bt_plugin.loading import patching, registry

import support

# A tiny WordPiece vocabulary, so the pipeline test has a real tokenizer without network access.
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "the", "quick", "brown",
         "fox", "jumps", "over", "lazy", "dog", "##s", "a", "b", "c"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A saved BertModel (realistic width, 3 layers) with a matching tokenizer next to it."""
    directory = tmp_path_factory.mktemp("bert")
    support.save_model("bert", directory, pad_token_id=0)
    support.wordpiece_tokenizer(WORDS, directory).save_pretrained(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def head_dir(tmp_path_factory):
    """A saved BertForSequenceClassification."""
    return support.save_model("bert", tmp_path_factory.mktemp("bert_head"), head=True, seed=1)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A saved tiny GPT2Model: a transformers model bt_plugin does not serve."""
    directory = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    GPT2Model(_gpt2_config()).save_pretrained(str(directory))
    return str(directory)


def _gpt2_config():
    return GPT2Config(vocab_size=support.VOCAB, n_embd=64, n_layer=2, n_head=2, n_positions=64)


@pytest.fixture
def originals():
    """The class-dict entries of the wrapped classmethods before any patching."""
    assert not patching.is_patched()
    return {name: PreTrainedModel.__dict__[name] for name in ("from_pretrained", "_from_config")}


def assert_stock(model):
    assert not bt_plugin.is_converted(model)
    assert "_bt_plugin" not in model.__dict__
    bert = getattr(model, "bert", model)
    assert all(type(layer) is BertLayer for layer in bert.encoder.layer)


def assert_converted(model):
    assert bt_plugin.is_converted(model)
    bert = getattr(model, "bert", model)
    assert all(isinstance(layer, BertLayer) and type(layer) is not BertLayer for layer in bert.encoder.layer)


def assert_unpatched(originals):
    assert not patching.is_patched()
    for name, original in originals.items():
        assert PreTrainedModel.__dict__[name] is original, name


# --------------------------------------------------------------------------------------------------
# enable(): every entry point that ends in from_pretrained / _from_config


def test_stock_loads_are_stock_without_enable(bert_dir, originals):
    assert_stock(BertModel.from_pretrained(bert_dir))
    assert_stock(AutoModel.from_pretrained(bert_dir))
    assert_unpatched(originals)


def test_enable_converts_bert_model_from_pretrained(bert_dir):
    bt_plugin.enable()
    model = BertModel.from_pretrained(bert_dir)
    assert type(model) is BertModel
    assert_converted(model)


def test_enable_converts_auto_model(bert_dir):
    bt_plugin.enable()
    model = AutoModel.from_pretrained(bert_dir)
    assert isinstance(model, BertModel)
    assert_converted(model)


def test_enable_converts_auto_model_for_sequence_classification(head_dir):
    bt_plugin.enable()
    model = AutoModelForSequenceClassification.from_pretrained(head_dir)
    assert isinstance(model, transformers.BertForSequenceClassification)
    assert_converted(model)
    # and the converted head model still gives the stock logits on a padded batch
    stock = AutoModelForSequenceClassification.from_pretrained(head_dir, bt_plugin=False)
    assert_stock(stock)
    ids, mask = support.padded_batch([7, 3, 10], length=12)
    with torch.inference_mode():
        fused = model(input_ids=ids, attention_mask=mask).logits
        expected = stock(input_ids=ids, attention_mask=mask).logits
    assert support.max_diff_on_real(fused, expected, None) < 1e-4


def test_enable_converts_output_loading_info_tuple(bert_dir):
    bt_plugin.enable()
    model, info = BertModel.from_pretrained(bert_dir, output_loading_info=True)
    assert isinstance(info, dict)
    assert_converted(model)


def test_enable_converts_feature_extraction_pipeline(bert_dir):
    bt_plugin.enable()
    extractor = pipeline("feature-extraction", model=bert_dir, tokenizer=bert_dir, device="cpu")
    assert_converted(extractor.model)
    features = extractor(["hello world", "the quick brown fox jumps over the lazy dog"])
    with bt_plugin.enabled(False):
        stock = pipeline("feature-extraction", model=bert_dir, tokenizer=bert_dir, device="cpu")
    assert_stock(stock.model)
    expected = stock(["hello world", "the quick brown fox jumps over the lazy dog"])
    for got, want in zip(features, expected):
        assert (torch.tensor(got) - torch.tensor(want)).abs().max().item() < 1e-4


def test_enable_converts_auto_model_from_config():
    bt_plugin.enable()
    config = support.make_config("bert")
    model = AutoModel.from_config(config)
    assert_converted(model)


def test_from_config_is_stock_without_enable(originals):
    assert_stock(AutoModel.from_config(support.make_config("bert")))
    assert_unpatched(originals)


# --------------------------------------------------------------------------------------------------
# disable(): the patch goes away exactly


def test_disable_restores_original_classmethods(bert_dir, originals):
    bt_plugin.enable()
    assert patching.is_patched()
    for name, original in originals.items():
        assert PreTrainedModel.__dict__[name] is not original
    assert_converted(AutoModel.from_pretrained(bert_dir))
    bt_plugin.disable()
    assert_unpatched(originals)
    assert_stock(AutoModel.from_pretrained(bert_dir))
    assert_stock(AutoModel.from_config(support.make_config("bert")))


def test_enable_twice_installs_one_wrapper(bert_dir, originals):
    bt_plugin.enable()
    bt_plugin.enable()
    for name, original in originals.items():
        entry = PreTrainedModel.__dict__[name]
        assert isinstance(entry, wrapt.FunctionWrapper), name
        assert entry.__wrapped__ is original, name  # not a wrapper around a wrapper
        assert isinstance(entry.__wrapped__, classmethod)
    assert_converted(BertModel.from_pretrained(bert_dir))
    bt_plugin.disable()  # once is enough
    assert_unpatched(originals)
    assert_stock(BertModel.from_pretrained(bert_dir))


def test_disable_without_enable_is_harmless(originals):
    bt_plugin.disable()
    bt_plugin.disable()
    assert_unpatched(originals)


# --------------------------------------------------------------------------------------------------
# enabled(): scoped activation


def test_enabled_scope_converts_only_inside(bert_dir, originals):
    with bt_plugin.enabled():
        assert patching.is_patched()
        inside = AutoModel.from_pretrained(bert_dir)
        inside_config = AutoModel.from_config(support.make_config("bert"))
    assert_converted(inside)
    assert_converted(inside_config)
    assert_unpatched(originals)  # not globally enabled: removed at the end of the block
    assert_stock(AutoModel.from_pretrained(bert_dir))


def test_enabled_scope_exits_cleanly_on_error(bert_dir, originals):
    with pytest.raises(RuntimeError, match="boom"):
        with bt_plugin.enabled():
            raise RuntimeError("boom")
    assert_unpatched(originals)
    assert_stock(AutoModel.from_pretrained(bert_dir))


def test_enabled_scope_keeps_patch_when_globally_enabled(bert_dir):
    bt_plugin.enable()
    with bt_plugin.enabled():
        assert_converted(AutoModel.from_pretrained(bert_dir))
    assert patching.is_patched()
    assert_converted(AutoModel.from_pretrained(bert_dir))


def test_enabled_false_inside_global_enable_gives_stock(bert_dir):
    bt_plugin.enable()
    with bt_plugin.enabled(False):
        assert_stock(AutoModel.from_pretrained(bert_dir))
        assert_stock(AutoModel.from_config(support.make_config("bert")))
    assert patching.is_patched()
    assert_converted(AutoModel.from_pretrained(bert_dir))


def test_nested_scopes(bert_dir, originals):
    with bt_plugin.enabled():
        with bt_plugin.enabled(False):
            assert_stock(BertModel.from_pretrained(bert_dir))
        assert_converted(BertModel.from_pretrained(bert_dir))
        assert patching.is_patched()
    assert_unpatched(originals)


def test_scope_is_per_thread(bert_dir, originals):
    entered, b_loaded, done = threading.Event(), threading.Event(), threading.Event()
    results: dict[str, object] = {}

    def thread_a():
        try:
            with bt_plugin.enabled():
                entered.set()
                assert b_loaded.wait(60)
                results["a"] = BertModel.from_pretrained(bert_dir)
        except BaseException as error:  # surfaced in the main thread
            results["error"] = error
        finally:
            entered.set()
            done.set()

    worker = threading.Thread(target=thread_a)
    worker.start()
    try:
        assert entered.wait(60)
        assert "error" not in results
        assert patching.is_patched()  # A's scope is open: the wrapper is installed ...
        results["b"] = BertModel.from_pretrained(bert_dir)  # ... yet this thread's load is stock
    finally:
        b_loaded.set()
        worker.join(120)
    assert done.is_set() and not worker.is_alive()
    if "error" in results:
        raise results["error"]
    assert_stock(results["b"])
    assert_converted(results["a"])
    assert_unpatched(originals)


def test_scope_is_per_asyncio_task(bert_dir, originals):
    async def main():
        entered, b_loaded = asyncio.Event(), asyncio.Event()

        async def task_a():
            with bt_plugin.enabled():
                entered.set()
                await asyncio.sleep(0)
                await b_loaded.wait()
                await asyncio.sleep(0)
                return BertModel.from_pretrained(bert_dir)

        async def task_b():
            await entered.wait()
            await asyncio.sleep(0)
            assert patching.is_patched()
            model = BertModel.from_pretrained(bert_dir)  # A's scope is still open here
            b_loaded.set()
            return model

        return await asyncio.gather(task_a(), task_b())

    model_a, model_b = asyncio.run(main())
    assert_converted(model_a)
    assert_stock(model_b)
    assert_unpatched(originals)


# --------------------------------------------------------------------------------------------------
# per-call bt_plugin= keyword


def test_per_call_opt_out_when_enabled(bert_dir):
    bt_plugin.enable()
    assert_stock(BertModel.from_pretrained(bert_dir, bt_plugin=False))
    assert_stock(AutoModel.from_pretrained(bert_dir, bt_plugin=False))
    assert_converted(AutoModel.from_pretrained(bert_dir, bt_plugin=None))


def test_per_call_opt_in_when_patched_but_not_enabled_here(bert_dir):
    with bt_plugin.enabled(False):  # wrapper installed, this context not enabled
        assert patching.is_patched()
        assert_stock(AutoModel.from_pretrained(bert_dir))
        assert_converted(AutoModel.from_pretrained(bert_dir, bt_plugin=True))
        assert_converted(BertModel.from_pretrained(bert_dir, bt_plugin=True))


@pytest.mark.parametrize("value", ["yes", 0.5, "False"])
def test_per_call_invalid_value_raises_type_error(bert_dir, value):
    bt_plugin.enable()
    with pytest.raises(TypeError, match="bt_plugin="):
        BertModel.from_pretrained(bert_dir, bt_plugin=value)


# --------------------------------------------------------------------------------------------------
# kernel names


def _assert_lists_kernels(error: pytest.ExceptionInfo):
    message = str(error.value)
    assert "'nope'" in message
    assert "auto" in kernels.KERNEL_CHOICES
    for name in kernels.KERNEL_CHOICES:
        assert name in message


def test_enable_unknown_kernel(originals):
    with pytest.raises(ValueError) as error:
        bt_plugin.enable(kernel="nope")
    _assert_lists_kernels(error)
    assert_unpatched(originals)


def test_enabled_unknown_kernel(originals):
    with pytest.raises(ValueError) as error:
        with bt_plugin.enabled(kernel="nope"):
            pytest.fail("the block must not run")
    _assert_lists_kernels(error)
    assert_unpatched(originals)
    assert patching._active_scopes == 0


def test_convert_unknown_kernel():
    model = BertModel(support.make_config("bert"))
    with pytest.raises(ValueError) as error:
        bt_plugin.convert(model, kernel="nope")
    _assert_lists_kernels(error)
    assert_stock(model)


def test_every_valid_kernel_name_is_accepted(bert_dir):
    for name in kernels.KERNEL_CHOICES:
        bt_plugin.enable(kernel=name)
        assert_converted(BertModel.from_pretrained(bert_dir))
        with bt_plugin.enabled(kernel=name):
            assert_converted(BertModel.from_pretrained(bert_dir))
        bt_plugin.disable()


# --------------------------------------------------------------------------------------------------
# unsupported models


def test_convert_unsupported_model_raises():
    model = GPT2Model(_gpt2_config())
    with pytest.raises(ValueError) as error:
        bt_plugin.convert(model)
    message = str(error.value)
    assert "GPT2Model" in message
    assert "'gpt2'" in message
    supported = registry.supported_model_types()
    assert "bert" in supported
    for model_type in supported:
        assert model_type in message
    assert not bt_plugin.is_converted(model)


def test_enabled_load_of_unsupported_model_stays_stock(gpt2_dir, caplog):
    bt_plugin.enable()
    with caplog.at_level(logging.WARNING, logger="bt_plugin"):
        model = AutoModel.from_pretrained(gpt2_dir)
    assert type(model) is GPT2Model
    assert not bt_plugin.is_converted(model)
    assert "_bt_plugin" not in model.__dict__
    warnings = [r for r in caplog.records if r.name == "bt_plugin" and r.levelno >= logging.WARNING]
    assert warnings and all("GPT2Model" in r.getMessage() for r in warnings)
    # the model works as a stock model
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    assert out.shape == (1, 3, model.config.n_embd)


# --------------------------------------------------------------------------------------------------
# logging


def test_converted_load_logs_one_info_record(bert_dir, caplog):
    bt_plugin.enable()
    with caplog.at_level(logging.DEBUG, logger="bt_plugin"):
        model = BertModel.from_pretrained(bert_dir)
    assert_converted(model)
    records = [r for r in caplog.records if r.name == "bt_plugin" and r.levelno >= logging.INFO]
    assert len(records) == 1, [r.getMessage() for r in records]
    record = records[0]
    assert record.levelno == logging.INFO
    layers = model.config.num_hidden_layers
    kernel = kernels.resolve_kernel_name("auto", next(model.parameters()).device.type)
    assert record.getMessage() == f"BertModel: {layers}/{layers} layers fused ({kernel})"


def test_stock_load_logs_nothing(bert_dir, caplog):
    with caplog.at_level(logging.DEBUG, logger="bt_plugin"):
        with bt_plugin.enabled(False):
            BertModel.from_pretrained(bert_dir)
    assert [r for r in caplog.records if r.name == "bt_plugin"] == []
