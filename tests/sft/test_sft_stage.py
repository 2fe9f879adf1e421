"""The SFT launcher end to end: 2 DDP ranks and 2 FSDP ranks equal 1 process; stop + resume equals an uninterrupted run;
init from a pretrained checkpoint with the vocabulary grown for the chat tokens."""

from __future__ import annotations

import json
import random

import pytest
import torch

from tests.helpers import final_params, read_metrics, run_launcher


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    rng = random.Random(0)
    d = tmp_path_factory.mktemp("sft")
    with (d / "train.jsonl").open("w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    return d / "train.jsonl"


def _args(data, out, *extra):
    return ["launch/sft.py", "model.preset=debug", "model.block_size=32", "tokenizer.name=byte", f"sft.data={data}",
            "sft.eval_fraction=0.25", "sft.eval_examples=6", "sft.max_new_tokens=4", "sft.eval_batch_size=3",
            "train.batch_size=4", "train.micro_batch_size=2", "train.dtype=fp32", "train.deterministic=true",
            "optim.warmup_steps=2", "optim.schedule=constant", "optim.lr=3e-3", "parallel.device=cpu", "eval.interval=0", "eval.steps=1",
            f"out_dir={out}", "checkpoint.resume=auto", *extra]


def test_two_ranks_equal_one_and_resume_is_exact(sft_data, tmp_path):
    run_launcher(_args(sft_data, tmp_path / "one", "train.max_steps=6"))
    run_launcher(_args(sft_data, tmp_path / "two", "train.max_steps=6"), nproc=2)
    # FSDP (packed rows with per-example attention, sharded params) gives the same run as well
    run_launcher(_args(sft_data, tmp_path / "fsdp", "train.max_steps=6", "parallel.strategy=fsdp"), nproc=2)
    # stopped after 3 steps (a checkpoint; constant lr, so max_steps=3 changes no lr), then resumed to 6:
    # the loader continues at the exact row
    run_launcher(_args(sft_data, tmp_path / "res", "train.max_steps=6", "checkpoint.interval=3",
                       "train.log_interval=1") + ["train.max_steps=3"])
    run_launcher(_args(sft_data, tmp_path / "res", "train.max_steps=6", "checkpoint.interval=3", "train.log_interval=1"))
    one, two, res, fsdp = (final_params(tmp_path / n) for n in ("one", "two", "res", "fsdp"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-6, rtol=1e-5)
        if not k.endswith("attn.wk.bias"):  # exactly-zero true gradient: Adam amplifies float noise (see GRPO test)
            torch.testing.assert_close(fsdp[k], one[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(res[k], one[k]), k
    m = read_metrics(tmp_path / "one")
    evals = [r for r in m if "val/exact_match" in r]
    assert evals and 0.0 <= evals[-1]["val/exact_match"] <= 1.0 and "val/loss" in evals[-1]
    # the chat tokenizer (byte + 4 specials) is stored in the checkpoint and reloads
    from llm_dist.sample import load_model
    model, tok, cfg = load_model(str(tmp_path / "one"))
    assert tok.vocab_size == 261 and cfg.model.vocab_size == 261 and "<|assistant|>" in tok.special_tokens


def test_init_from_pretrained_grows_vocab_with_mean_rows(tmp_path, prepared_byte_data):
    run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=2", "eval.sample_tokens=0",
                  f"data.dir={prepared_byte_data}", "train.detect_anomaly=false", f"out_dir={tmp_path / 'pre'}"])
    from llm_dist.config import Config
    from llm_dist.model.transformer import build_model
    from llm_dist.sample import resolve_checkpoint
    from llm_dist.sft.chat import add_chat_tokens
    from llm_dist.stages import checkpoint_model_config, init_from_checkpoint, setup_chat_model

    cfg = Config()
    cfg.sft.init_from = str(tmp_path / "pre")
    tok, url = setup_chat_model(cfg, cfg.sft.init_from)
    assert url == resolve_checkpoint(str(tmp_path / "pre")) and checkpoint_model_config(url).vocab_size == 257
    assert cfg.model.n_layer == 2 and cfg.model.n_embd == 64 and cfg.model.vocab_size == 261 == tok.vocab_size
    assert tok.special_tokens == add_chat_tokens(tok).special_tokens
    model = build_model(cfg.model, "cpu")
    init_from_checkpoint(model, url, 261)
    pre = final_params(tmp_path / "pre")["tok_emb.weight"]  # (320, 64): 257 real rows + padding
    w = model.tok_emb.weight.detach()
    assert torch.equal(w[:257], pre[:257])
    torch.testing.assert_close(w[257:261], pre[:257].mean(0).expand(4, -1))
    assert torch.equal(w[261:], torch.zeros_like(w[261:]))
    assert model.lm_head.weight is model.tok_emb.weight  # still tied
