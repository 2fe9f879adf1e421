"""Named model shapes. A preset fills `model.*` keys; explicit keys in YAML or on the CLI override it."""

from __future__ import annotations

PRESETS: dict[str, dict] = {
    # Seconds on a laptop CPU: for tests and the debug config.
    "debug": dict(block_size=64, n_layer=2, n_head=4, n_embd=64),
    # GPT-2 family (Radford et al. 2019): learned positions, pre-LayerNorm, GELU, biases, tied embeddings.
    "gpt2-124M": dict(block_size=1024, n_layer=12, n_head=12, n_embd=768),
    "gpt2-350M": dict(block_size=1024, n_layer=24, n_head=16, n_embd=1024),
    "gpt2-774M": dict(block_size=1024, n_layer=36, n_head=20, n_embd=1280),
    # Llama-style ~1B (shape of Llama 3.2 1B on GPT-2's vocabulary): RoPE, RMSNorm, SwiGLU, GQA 32/8, no biases.
    "llama-1b": dict(
        block_size=2048, n_layer=16, n_head=32, n_kv_head=8, n_embd=2048, mlp="swiglu", mlp_hidden=8192,
        norm="rmsnorm", pos_emb="rope", rope_theta=500000.0, bias=False, tie_embeddings=True,
    ),
}


def get_preset(name: str) -> dict:
    """The `model.*` values of a named preset (a copy). Raises KeyError with the valid names."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; expected one of {', '.join(PRESETS)}")
    return dict(PRESETS[name])
