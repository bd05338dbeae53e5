"""Specs for decoder-only backbones used as encoders: embedders, rerankers and classifiers built on
Qwen, Llama, Mistral, Gemma and their kin, called for one forward pass.

Read in transformers 5.0 - 5.24: each decoder layer computes attention through transformers'
attention interface, takes the causal (or, where the config says so, bidirectional) mask, the rotary
`(cos, sin)` as `position_embeddings` and the `position_ids`, and a KV cache (`cache`, earlier
`past_key_values`) that the model makes fresh when `use_cache` defaults to on. No fused layout is
declared: the `layercode` path runs each layer's own code on the packed real tokens (RMSNorm, gated
MLP, q/k norms, grouped-query heads), attention per sequence with the mask stock applies among its
real tokens (causal, sliding windows, bidirectional Gemma 3), Gemma 2's score soft-capping
included. The fresh cache is filled at stock's positions (`fills_cache`): a `generate()` prefill runs
padding-free, every later decoding step (a non-empty cache) runs stock.

Heads: a causal LM's next-token logits and a decoder classifier (which pools the last token that is
not `pad_token_id`, found by id, not by the mask) read the last position: padded rows are computed as
stock on a call where a row's last position is padding (right padding); left padding, what these
models are run with, stays padding-free. Question answering reads every position.

- Versions: before 5.0 the masks of padded query rows were unmasked to attend every key (so the
  padding could not be told from the mask) and the cache argument had another name; the specs are
  limited to 5.0 on (`transformers=">=5.0"`), older releases leave these models stock with the reason.
- Checked and not registered: Falcon (its own attention code, ALiBi), gpt-oss (attention sinks),
  mixture-of-experts variants (untested here), and anything needing `trust_remote_code`.
"""

from bt_plugin.spec import EncoderSpec

_MODELS = "transformers.models"
DECODER_HEAD_READS = (
    ("ForCausalLM", "last"), ("ForSequenceClassification", "last"), ("ForQuestionAnswering", "every"),
)
_DECODER = dict(attention_interface=True, layer_kwargs=("position_embeddings", "position_ids"),
                head_reads=DECODER_HEAD_READS, fills_cache=True, transformers=">=5.0")


def _decoder(name: str, module: str, layer: str, model_types: tuple[str, ...] | None = None,
             layer_index: str = "self_attn.layer_idx") -> EncoderSpec:
    return EncoderSpec(name=name, model_types=model_types or (name,), layer_index=layer_index,
                       layer_classes=(f"{_MODELS}.{module}.modeling_{module}.{layer}",), **_DECODER)


SPECS: list[EncoderSpec] = [
    _decoder("qwen3", "qwen3", "Qwen3DecoderLayer"),
    _decoder("qwen2", "qwen2", "Qwen2DecoderLayer"),
    _decoder("llama", "llama", "LlamaDecoderLayer"),
    _decoder("mistral", "mistral", "MistralDecoderLayer"),
    _decoder("ministral", "ministral", "MinistralDecoderLayer"),
    _decoder("gemma", "gemma", "GemmaDecoderLayer"),
    _decoder("gemma2", "gemma2", "Gemma2DecoderLayer"),
    _decoder("gemma3_text", "gemma3", "Gemma3DecoderLayer"),
    _decoder("phi3", "phi3", "Phi3DecoderLayer"),
    _decoder("granite", "granite", "GraniteDecoderLayer"),
    _decoder("olmo2", "olmo2", "Olmo2DecoderLayer"),
    _decoder("smollm3", "smollm3", "SmolLM3DecoderLayer"),
    _decoder("modernbert_decoder", "modernbert_decoder", "ModernBertDecoderLayer", ("modernbert-decoder",),
             layer_index="layer_idx"),
]
