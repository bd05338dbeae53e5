"""The transformers `Trainer` with a converted model: `evaluate()` (eval_strategy="steps") and
`predict()` between training steps run fused and equal a stock model's, and training, which runs
the stock layer code, gives the same losses step for step as the same run on a stock model."""

from __future__ import annotations

import pytest
import torch

import bt_plugin
import support

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 1e-5
STEPS = 6
EVAL_EVERY = 2
PREDICT_AT = 3


def _examples(count: int, seed: int) -> list[dict]:
    """Token sequences of very different lengths (6 to 64) with binary labels."""
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(6, 65, (count,), generator=generator).tolist()
    return [{"input_ids": torch.randint(5, support.VOCAB, (n,), generator=generator).tolist(),
             "labels": int(torch.randint(0, 2, (1,), generator=generator))} for n in lengths]


def _collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch (pad id 0), with its attention mask."""
    width = max(len(e["input_ids"]) for e in examples)
    ids = torch.zeros(len(examples), width, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    for row, example in enumerate(examples):
        ids[row, :len(example["input_ids"])] = torch.tensor(example["input_ids"])
        mask[row, :len(example["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([e["labels"] for e in examples])}


class Record:
    """What one training run saw: the predictions of each evaluation and of the mid-training
    `predict()` (in order: compute_metrics sees both), what `predict()` returned, and (converted
    run) the layer calls made by each of them."""

    def __init__(self):
        self.evaluations: list[torch.Tensor] = []
        self.predictions: list[torch.Tensor] = []
        self.calls: list[tuple[str, list[tuple[int, int]], list[tuple[int, int]]]] = []
        self.model = None


def _train(model_dir: str, output_dir: str, converted: bool) -> tuple[list, Record]:
    from transformers import AutoModelForSequenceClassification, Trainer, TrainerCallback, TrainingArguments

    if converted:
        with bt_plugin.enabled():
            model = AutoModelForSequenceClassification.from_pretrained(model_dir)
        assert bt_plugin.is_converted(model)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    record = Record()
    train, evaluation = _examples(48, seed=1), _examples(20, seed=2)

    def compute_metrics(prediction) -> dict:
        record.evaluations.append(torch.as_tensor(prediction.predictions))
        return {}

    class Watch(TrainerCallback):
        """predict() at step PREDICT_AT; the layer calls around it and around each evaluation
        (which runs right after its step's on_step_end)."""

        def on_step_end(self, args, state, control, **kwargs):
            self.before = support.layer_calls(model) if converted else []
            if state.global_step == PREDICT_AT:
                record.predictions.append(torch.as_tensor(trainer.predict(evaluation).predictions))
                if converted:
                    record.calls.append(("predict", self.before, support.layer_calls(model)))
                    self.before = support.layer_calls(model)

        def on_evaluate(self, args, state, control, **kwargs):
            if converted:
                record.calls.append(("evaluate", self.before, support.layer_calls(model)))

    args = TrainingArguments(
        output_dir=output_dir, max_steps=STEPS, per_device_train_batch_size=8, per_device_eval_batch_size=8,
        eval_strategy="steps", eval_steps=EVAL_EVERY, logging_steps=1, learning_rate=1e-3, seed=0,
        report_to="none", save_strategy="no", use_cpu=True, disable_tqdm=True, dataloader_num_workers=0,
    )
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=evaluation,
                      data_collator=_collate, compute_metrics=compute_metrics, callbacks=[Watch()])
    trainer.train()
    record.model = model
    return trainer.state.log_history, record


def test_evaluate_and_predict_mid_training_run_fused_and_training_is_unchanged(tmp_path):
    model_dir = support.save_model("bert", tmp_path / "model", head=True, hidden_dropout_prob=0.1)
    stock_log, stock = _train(model_dir, str(tmp_path / "stock"), converted=False)
    fused_log, fused = _train(model_dir, str(tmp_path / "fused"), converted=True)

    # training steps after every evaluation and the predict(): the same losses, bit for bit
    losses = [(e["step"], e["loss"]) for e in stock_log if "loss" in e]
    assert len(losses) == STEPS
    assert [(e["step"], e["loss"]) for e in fused_log if "loss" in e] == losses
    # evaluations and the mid-training predict(): equal to stock's
    eval_losses = [e["eval_loss"] for e in stock_log if "eval_loss" in e]
    assert len(eval_losses) == STEPS // EVAL_EVERY
    assert [e["eval_loss"] for e in fused_log if "eval_loss" in e] == pytest.approx(eval_losses, abs=ATOL)
    assert len(fused.evaluations) == len(stock.evaluations) == STEPS // EVAL_EVERY + 1  # and the predict()
    assert len(fused.predictions) == len(stock.predictions) == 1
    for got, expected in zip(fused.evaluations + fused.predictions, stock.evaluations + stock.predictions):
        assert (got - expected).abs().max().item() <= ATOL
    # ... and they ran fused: every layer, every batch (3 of 8, 8, 4 rows), no fallback; training
    # steps ran the stock layer code, one call per layer and step, with that reason
    assert [kind for kind, _, _ in fused.calls] == ["evaluate", "predict", "evaluate", "evaluate"]
    for kind, before, after in fused.calls:
        assert [(a[0] - b[0], a[1] - b[1]) for a, b in zip(after, before)] == [(3, 0)] * len(after), (kind, before, after)
    layers = bt_plugin.explain(fused.model).layers
    assert [layer.fallback_reasons for layer in layers] == [{"the layer was in training mode (model.train())": STEPS}] * len(layers)
