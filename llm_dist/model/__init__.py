"""The decoder-only transformer, its construction and generation.

    from llm_dist.model import build_model, model_summary, generate
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    print(model_summary(model))

`llm_dist.model.generate` is the function (re-exported here); its module is reached with
`from llm_dist.model.generate import KVCache, sample_next`.
"""

from llm_dist.model.attention import CausalSelfAttention
from llm_dist.model.generate import KVCache, filter_logits, generate, sample_next, sampling_probs
from llm_dist.model.layers import MLP, RMSNorm
from llm_dist.model.transformer import Block, Transformer, build_model, model_summary, padded_vocab_size

__all__ = [
    "Block", "CausalSelfAttention", "KVCache", "MLP", "RMSNorm", "Transformer", "build_model",
    "filter_logits", "generate", "model_summary", "padded_vocab_size", "sample_next", "sampling_probs",
]
