"""A trained reward model as a scorer: load it frozen from a checkpoint, score chat sequences in batches.

Used by the RL stages (`rl.reward_model`) to reward completions instead of a task's rule. The model is the
transformer with its scalar head (`model.score_head`), read at each sequence's last token (the chat
format's end-of-turn token, e.g. `<|end|>`, that closes the response, as in training:
`llm_dist.reward.data.sequence`). Every rank holds a whole frozen copy (like the reference policy): scoring
needs no collective.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from llm_dist.config import ConfigError
from llm_dist.reward.data import right_pad
from llm_dist.reward.loss import last_token_scores
from llm_dist.tokenizer import Tokenizer


def load_reward_model(path: str, device: torch.device) -> tuple[nn.Module, Tokenizer]:
    """(frozen reward model on `device` in eval mode, its tokenizer) from a checkpoint or run dir."""
    from llm_dist.checkpoint import load_checkpoint_tokenizer
    from llm_dist.lora_checkpoint import load_weights
    from llm_dist.model.transformer import build_model
    from llm_dist.stages import checkpoint_model_config, resolve_checkpoint_url

    url = resolve_checkpoint_url(path)
    mcfg = checkpoint_model_config(url)
    if not mcfg.score_head:
        raise ConfigError(f"rl.reward_model {path}: {url} is not a reward model (its model has no score head; "
                          "train one with launch/reward.py)")
    model = build_model(mcfg, "cpu")
    load_weights(model, url)  # a LoRA reward model: its recorded base, then the adapters
    return model.to(device).eval().requires_grad_(False), load_checkpoint_tokenizer(url)


def check_same_tokenizer(policy_tok: Tokenizer, rm_tok: Tokenizer, path: str) -> None:
    """The reward model reads the policy's token ids directly, so both must use the same vocabulary."""
    if policy_tok.vocab_size != rm_tok.vocab_size or policy_tok.special_tokens != rm_tok.special_tokens:
        raise ConfigError(f"rl.reward_model {path}: its tokenizer ({rm_tok.name}, {rm_tok.vocab_size} ids) differs "
                          f"from the policy's ({policy_tok.name}, {policy_tok.vocab_size} ids)")


@torch.no_grad()
def score_sequences(model: nn.Module, seqs: Sequence[Sequence[int]], pad_id: int, batch_size: int = 32
                    ) -> torch.Tensor:
    """Reward (n,) fp32 on the CPU of each token sequence, read at its last token; right-padded batches.

    Sequences longer than the reward model's context keep their last tokens (as its training data).
    """
    device = next(model.parameters()).device
    T_max = model.cfg.block_size
    out = []
    for i in range(0, len(seqs), batch_size):
        x, last = right_pad([list(s)[-T_max:] for s in seqs[i:i + batch_size]], pad_id)  # (b, T), (b,)
        out.append(last_token_scores(model, x.to(device), last.to(device)).float().cpu())
    return torch.cat(out)
