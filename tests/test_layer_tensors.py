"""A fused layer carries BetterTransformer's tensors, and they are the stock weights (no copies)."""

import torch

import bt_plugin
from support import make_config
from transformers import BertModel


def test_fused_layer_exposes_bettertransformer_tensors():
    torch.manual_seed(0)
    stock = BertModel(make_config("bert")).eval()
    fused = bt_plugin.convert(BertModel(make_config("bert")).eval())
    fused.load_state_dict(stock.state_dict())
    for s, f in zip(stock.encoder.layer, fused.encoder.layer):
        a = s.attention.self
        assert torch.equal(f.in_proj_weight, torch.cat([a.query.weight, a.key.weight, a.value.weight]))
        assert torch.equal(f.in_proj_bias, torch.cat([a.query.bias, a.key.bias, a.value.bias]))
        # the fused in-projection *is* q/k/v's storage
        q = f.attention.self.query.weight
        assert f.in_proj_weight.data_ptr() == q.data_ptr()
        assert f.out_proj_weight is f.attention.output.dense.weight
        assert f.linear1_weight is f.intermediate.dense.weight
        assert f.linear2_bias is f.output.dense.bias
        assert f.norm1_weight is f.attention.output.LayerNorm.weight
        assert f.norm2_bias is f.output.LayerNorm.bias
        assert f.norm1_eps == s.attention.output.LayerNorm.eps
        assert f.num_heads == a.num_attention_heads
        assert f.embed_dim == stock.config.hidden_size
        assert f.norm_first is False
