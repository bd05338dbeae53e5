"""BERT-style encoder layers: post-layer-norm, exact gelu, fused by PyTorch's kernel.

The layer (`BertLayer` and its copies in the other model families) is
`attention.self.{query,key,value}` -> `attention.output.dense` -> `attention.output.LayerNorm`
-> `intermediate.dense` -> `intermediate.intermediate_act_fn` -> `output.dense` -> `output.LayerNorm`.
"""

from bt_plugin.spec import EncoderSpec, config_flags_false

_MODELS = "transformers.models"

# The attribute paths of BertLayer, shared by every family that copies it (patches/text.py).
BERT_LAYER_PATHS = dict(
    query="attention.self.query",
    key="attention.self.key",
    value="attention.self.value",
    out_proj="attention.output.dense",
    norm1="attention.output.LayerNorm",
    linear1="intermediate.dense",
    activation="intermediate.intermediate_act_fn",
    linear2="output.dense",
    norm2="output.LayerNorm",
    num_heads="attention.self.num_attention_heads",
)
# Causal self-attention and cross-attention are not fused: such configurations stay stock.
ENCODER_ONLY = config_flags_false("is_decoder", "add_cross_attention")

# What text task heads read at padded positions without the mask. Question answering takes the
# argmax of start/end logits over every position (training pushes padded ones down, so zeros
# there could win); sequence classification and multiple choice read the first token, which is
# padding in a left-padded row (poolers are found by name, see bt_plugin.dispatch.heads). Token
# classification and masked-LM logits at padded positions are discarded by their pipelines,
# losses (label -100) and metrics: those get zeros.
TEXT_HEAD_READS = (
    ("ForQuestionAnswering", "every"),
    ("ForSequenceClassification", "first"),
    ("ForMultipleChoice", "first"),
)

SPEC = EncoderSpec(
    name="bert",
    model_types=(
        "bert", "roberta", "xlm-roberta", "camembert", "electra", "ernie", "data2vec-text", "roc_bert",
    ),
    layer_classes=(
        f"{_MODELS}.bert.modeling_bert.BertLayer",
        f"{_MODELS}.roberta.modeling_roberta.RobertaLayer",
        f"{_MODELS}.xlm_roberta.modeling_xlm_roberta.XLMRobertaLayer",
        f"{_MODELS}.camembert.modeling_camembert.CamembertLayer",
        f"{_MODELS}.electra.modeling_electra.ElectraLayer",
        f"{_MODELS}.ernie.modeling_ernie.ErnieLayer",
        f"{_MODELS}.data2vec.modeling_data2vec_text.Data2VecTextLayer",
        f"{_MODELS}.roc_bert.modeling_roc_bert.RoCBertLayer",
    ),
    **BERT_LAYER_PATHS,
    head_reads=TEXT_HEAD_READS,
    attention_interface=">=5.0",  # BertSelfAttention calls ALL_ATTENTION_FUNCTIONS since 5.0: adapters run padding-free
    config_checks=(ENCODER_ONLY,),
)
