"""The decoder-only transformer, its construction, generation and Hugging Face interop.

    from llm_dist.model import build_model, model_summary, generate
    model = build_model(cfg.model, device, seed=cfg.train.seed)
    print(model_summary(model))

`llm_dist.model.generate` is the function (re-exported here); its module is reached with
`from llm_dist.model.generate import sample_next`. Caches live in `llm_dist.model.kv_cache`, beam search in
`llm_dist.model.beam`, MoE in `llm_dist.model.moe`, the hand-written ops in `llm_dist.model.scratch` and
HF conversion in `llm_dist.model.hf_interop` (imported on use: it is not needed to train).
"""

from llm_dist.model.attention import CausalSelfAttention
from llm_dist.model.beam import BeamOutput, beam_search
from llm_dist.model.generate import filter_logits, generate, sample_next, sampling_probs
from llm_dist.model.kv_cache import KVCache, RollingKVCache
from llm_dist.model.layers import MLP, RMSNorm
from llm_dist.model.moe import MoE
from llm_dist.model.transformer import Block, Transformer, build_model, model_summary, padded_vocab_size

__all__ = [
    "BeamOutput", "Block", "CausalSelfAttention", "KVCache", "MLP", "MoE", "RMSNorm", "RollingKVCache", "Transformer",
    "beam_search", "build_model", "filter_logits", "generate", "model_summary", "padded_vocab_size", "sample_next",
    "sampling_probs",
]
