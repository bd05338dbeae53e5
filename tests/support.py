"""Shared test helpers: small realistic-width models saved and reloaded through from_pretrained."""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

import torch
import transformers

import bt_plugin

# model_type -> (config class, base model class, one task-head class), all with the family's defaults.
ARCHITECTURES = {
    "bert": ("BertConfig", "BertModel", "BertForSequenceClassification"),
    "roberta": ("RobertaConfig", "RobertaModel", "RobertaForMaskedLM"),
    "xlm-roberta": ("XLMRobertaConfig", "XLMRobertaModel", "XLMRobertaForTokenClassification"),
    "camembert": ("CamembertConfig", "CamembertModel", "CamembertForSequenceClassification"),
    "electra": ("ElectraConfig", "ElectraModel", "ElectraForSequenceClassification"),
    "ernie": ("ErnieConfig", "ErnieModel", "ErnieForSequenceClassification"),
    "data2vec-text": ("Data2VecTextConfig", "Data2VecTextModel", "Data2VecTextForSequenceClassification"),
    "roc_bert": ("RoCBertConfig", "RoCBertModel", "RoCBertForSequenceClassification"),
}

VOCAB = 1000


def make_config(model_type: str, **overrides):
    """A realistic-width config (hidden 256, 4 heads, 3 layers) with the family's real defaults."""
    config_class = getattr(transformers, ARCHITECTURES[model_type][0])
    values = dict(
        vocab_size=VOCAB, hidden_size=256, num_attention_heads=4, intermediate_size=1024,
        num_hidden_layers=3, max_position_embeddings=128,
    )
    if model_type == "electra":
        values["embedding_size"] = 128
    values.update(overrides)
    return config_class(**values)


def model_class(model_type: str, head: bool = False):
    return getattr(transformers, ARCHITECTURES[model_type][2 if head else 1])


def save_model(model_type: str, directory, head: bool = False, seed: int = 0, **overrides) -> str:
    """Build a randomly initialised model from a config and save it; returns the directory."""
    torch.manual_seed(seed)
    model = model_class(model_type, head)(make_config(model_type, **overrides))
    model.save_pretrained(str(directory))
    return str(directory)


def stock_and_converted(cls, config, kernel: str = "auto", seed: int = 0, prepack: bool = False,
                        **load_kwargs) -> tuple:
    """`cls(config)` initialised from `seed`, saved to a temporary folder (deleted on return) and
    loaded back twice with `from_pretrained(**load_kwargs)`: stock, and under
    `bt_plugin.enabled(kernel=kernel, prepack=prepack)`; both in eval mode."""
    torch.manual_seed(seed)
    with tempfile.TemporaryDirectory(prefix=f"{config.model_type}-") as directory:
        cls(config).save_pretrained(directory)
        stock = cls.from_pretrained(directory, **load_kwargs).eval()
        with bt_plugin.enabled(kernel=kernel, prepack=prepack):
            converted = cls.from_pretrained(directory, **load_kwargs).eval()
    return stock, converted


def wordpiece_tokenizer(words: list[str], directory):
    """A `BertTokenizerFast` over `words` (transformers 5 takes the vocabulary itself; 4.x only a
    vocabulary file, written to `directory`)."""
    from transformers import BertTokenizerFast

    try:
        return BertTokenizerFast(vocab={word: i for i, word in enumerate(words)})
    except TypeError:  # transformers 4: the slow tokenizer it builds first needs vocab_file
        path = Path(directory) / "vocab.txt"
        path.write_text("\n".join(words) + "\n")
        return BertTokenizerFast(vocab_file=str(path))


def present(specs: list) -> list:
    """The specs of `specs` whose family this transformers version has (the registry skips the
    others with a reason, checked in tests/test_versions_and_races.py)."""
    from bt_plugin.loading import registry

    return [spec for spec in specs if spec.name in registry.all_specs()]


def hidden_of(output):
    """The hidden states a layer returned: a tensor (transformers 5) or the first item of its
    tuple (4.x layers return `(hidden_states, ...)`)."""
    return output[0] if isinstance(output, tuple) else output


def records_with_hooks() -> bool:
    """Whether this transformers records hidden states with forward hooks (5.x's output
    recorders) rather than in the encoder's own loop."""
    import importlib.util

    return importlib.util.find_spec("transformers.utils.output_capturing") is not None


def padded_batch(lengths: list[int], length: int | None = None, seed: int = 0, pad_token: int = 1):
    """Right-padded `(input_ids, attention_mask)` with the given real lengths."""
    generator = torch.Generator().manual_seed(seed)
    width = length or max(lengths)
    ids = torch.randint(5, VOCAB, (len(lengths), width), generator=generator)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, real in enumerate(lengths):
        mask[row, :real] = 1
        ids[row, real:] = pad_token
    return ids, mask


def max_diff_on_real(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    """Max abs difference over real-token positions (all positions when mask is None)."""
    if mask is None or a.dim() < 3:
        return (a - b).abs().max().item()
    real = mask.bool()
    return (a[real] - b[real]).abs().max().item()


class Wrapped(torch.nn.Module):
    """A replaced projection: what an adapter (unmerged LoRA, a quantized linear) looks like to bt_plugin."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


def layer_calls(model) -> list[tuple[int, int]]:
    """(fused calls, fallback calls) of each encoder layer of a converted model."""
    import bt_plugin

    return [(layer.fused_calls, layer.fallback_calls) for layer in bt_plugin.explain(model).layers]


def assert_ran_fused(model, before: list[tuple[int, int]] | None = None) -> None:
    """Every encoder layer is converted, ran fused (more often than `before`, from `layer_calls`)
    and never fell back: parity alone cannot tell a fused run from a silent, exact fallback."""
    import bt_plugin

    report = bt_plugin.explain(model)
    assert report.reason is None, report.reason
    assert report.layers, report
    assert all(layer.converted for layer in report.layers), report
    for index, layer in enumerate(report.layers):
        fused_before, fallback_before = before[index] if before else (0, 0)
        assert layer.fused_calls > fused_before, f"{layer.path} did not run fused:\n{report}"
        assert layer.fallback_calls == fallback_before, f"{layer.path} fell back ({layer.fallback_reasons}):\n{report}"
        assert layer.reason is None, f"{layer.path}: {layer.reason}\n{report}"


def save_reranker(directory, seed: int = 0) -> str:
    """all-MiniLM-L6-v2 with a seeded, randomly initialised one-label sequence-classification head
    (a cross-encoder's shape), saved with its tokenizer below `directory`; returns its directory.
    The same checkpoint as the benchmark's `minilm-reranker` shape."""
    from bt_plugin.tools.bench.models import reranker_source

    return reranker_source(Path(directory) / "reranker", seed)


def paragraph_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (query, passage) pairs of real English paragraphs in arrival order: a paragraph's
    first sentence against another paragraph, of very different lengths."""
    from bt_plugin.tools import corpus

    texts = corpus.sample(2 * count, seed)
    return [(texts[2 * i].split(". ")[0], texts[2 * i + 1]) for i in range(count)]


ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
# The pages whose ```python blocks run in one namespace, in this order (as a reader of the README
# and then of the site's pages would paste them): tests/test_readme.py. Every other page with a
# Python block runs on its own (EXECUTED_ALONE).
EXECUTED_IN_ORDER = (README, ROOT / "docs" / "getting-started.md", ROOT / "docs" / "precision.md",
                     ROOT / "docs" / "integrations.md")
EXECUTED_ALONE = (ROOT / "docs" / "adding-an-architecture.md",)


def python_blocks(page: Path) -> list[str]:
    """One page's ```python blocks, in order."""
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


def uses_ray(block: str) -> bool:
    return bool(re.search(r"^\s*(import ray|ray\.)", block, re.M))


def readme_python_blocks(ray: bool = False) -> list[tuple[Path, str]]:
    """`(page, block)` for the ```python blocks of EXECUTED_IN_ORDER, in order: those that use Ray
    (`ray=True`) or all the others. The Ray blocks run in tests/test_ray_data.py, which starts Ray once."""
    return [(page, block) for page in EXECUTED_IN_ORDER for block in python_blocks(page) if uses_ray(block) == ray]


# A worker process's own record, as a `sitecustomize` on its PYTHONPATH: when the process exits, every
# converted model's per-layer (converted, fused calls, fallback calls), read from explain(), is written
# to $BT_PLUGIN_TEST_RECORD (the Infinity server's and the RAG stacks' tests).
WORKER_RECORDER = """
import atexit, gc, json, os, warnings

def _record():
    import torch
    from bt_plugin.loading.report import explain
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        models = [m for m in gc.get_objects() if isinstance(m, torch.nn.Module) and "_bt_plugin" in m.__dict__]
    records = [[(l.converted, l.fused_calls, l.fallback_calls) for l in explain(m).layers] for m in models]
    with open(os.environ["BT_PLUGIN_TEST_RECORD"], "w") as out:
        json.dump({"pid": os.getpid(), "models": records}, out)

atexit.register(_record)
"""
