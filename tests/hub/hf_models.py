"""Tiny random Hugging Face models and a small byte-level BPE tokenizer, built from configs in the test (no
download), saved with `save_pretrained` the way hub folders are laid out."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

V = 317  # model vocabulary: not a multiple of 64 (padding on import, cut on export), above the tokenizer's 300 ids
EOS = "<|endoftext|>"
TEXT = ["hello world, the quick brown fox jumps over the lazy dog", "1+2=3 and 40+2=42; 7+8=15", "héllo wörld ✓"]


@lru_cache(maxsize=1)
def tokenizer_json() -> str:
    """A 300-id byte-level BPE (GPT-2 style) trained on a few sentences; id 0 is <|endoftext|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(TEXT * 20, trainer)
    return tk.to_str()


def save_tokenizer(folder: Path, extra_specials: tuple[str, ...] = ()):  # noqa: ANN201 - PreTrainedTokenizerFast
    """tokenizer.json + tokenizer_config.json (eos/bos = <|endoftext|>, plus `extra_specials` after the last id)
    in `folder`, as save_pretrained writes them."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tokenizer_json()), eos_token=EOS, bos_token=EOS)
    if extra_specials:
        fast.add_special_tokens({"additional_special_tokens": list(extra_specials)})
    fast.save_pretrained(folder)
    return fast


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 16}


def hf_model(kind: str, vocab: int = V) -> torch.nn.Module:
    """A 2-layer, 32-wide random model of one supported kind (eval mode, every tensor random, norms included)."""
    import transformers as tf

    V = vocab  # noqa: N806 - the module constant's role
    common = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, eos_token_id=0, bos_token_id=0)
    build = {
        "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=V, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                                         resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                                         eos_token_id=0, bos_token_id=0)),
        "llama3": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(**common, rope_theta=500000.0, rope_scaling=dict(LLAMA3))),
        "mistral": lambda: tf.MistralForCausalLM(tf.MistralConfig(**common, sliding_window=5)),
        "qwen2_tied": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=True)),
        "qwen2_untied": lambda: tf.Qwen2ForCausalLM(tf.Qwen2Config(**common, tie_word_embeddings=False,
                                                                   rope_theta=1e6)),
    }[kind]
    model = build().eval()
    torch.manual_seed(0)
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: random values make every mapping matter
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


def save_hf_folder(kind: str, folder: Path, vocab: int = V, extra_specials: tuple[str, ...] = ()) -> torch.nn.Module:
    """A model of `kind` plus the tokenizer saved to `folder`; returns the HF model."""
    model = hf_model(kind, vocab)
    model.save_pretrained(folder)
    save_tokenizer(folder, extra_specials)
    return model
