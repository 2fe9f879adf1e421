"""Tiny runs of the project's own stages, exported once per session for the Hugging Face tests:

- gpt2_run: GPT-2 layout (learned positions, LayerNorm, GELU, biases) with GPT-2's tokenizer, pretrained;
- llama_run: Llama layout (RoPE, RMSNorm, SwiGLU, GQA, untied head) with the byte tokenizer, pretrained;
- chat_run: SFT from scratch with a BPE trained in-test (+ the chat tokens), trained until it answers
  every prompt with "Yes." and `<|end|>`, so that generation stopping at the end-of-turn token is
  deterministic.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from tests.helpers import REPO, load_tool, run_launcher

TINY = ["model.block_size=32", "model.n_layer=1", "model.n_head=4", "model.n_embd=32", "train.dtype=fp32",
        "train.deterministic=true", "parallel.device=cpu", "train.batch_size=4", "train.micro_batch_size=4"]
LLAMA = ["model.pos_emb=rope", "model.norm=rmsnorm", "model.mlp=swiglu", "model.bias=false", "model.n_kv_head=2",
         "model.tie_embeddings=false"]


def _pretrain(out: Path, data: Path, tokenizer: str, *extra: str) -> Path:
    run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", *TINY, f"tokenizer.name={tokenizer}",
                  f"data.dir={data}", "data.source=data/tinyshakespeare/input.txt", "train.max_steps=3",
                  "eval.interval=0", "eval.sample_tokens=0", "train.detect_anomaly=false", "checkpoint.interval=3",
                  f"out_dir={out}", *extra])
    return out


def export(run: Path, out: Path, *extra: str) -> Path:
    """`tools/checkpoint.py export-hf run out` in-process; asserts exit status 0."""
    rc = load_tool("checkpoint").main(["export-hf", str(run), str(out), *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="session")
def gpt2_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("gpt2_run")
    return _pretrain(d / "run", d / "data", "gpt2")


@pytest.fixture(scope="session")
def llama_run(tmp_path_factory, prepared_byte_data) -> Path:
    d = tmp_path_factory.mktemp("llama_run")
    # A 512-byte context holds every multiple-choice item the lm-eval test scores, uncropped.
    return _pretrain(d / "run", prepared_byte_data, "byte", *LLAMA, "model.block_size=512")


@pytest.fixture(scope="session")
def chat_run(tmp_path_factory) -> Path:
    from llm_dist.tokenizer import train_bpe

    d = tmp_path_factory.mktemp("chat_run")
    text = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:50_000]
    train_bpe([text], 300, pattern="gpt2", num_proc=1, progress=False).to_tokenizer("shk300").save(d / "tok.json")
    rng = random.Random(0)
    with (d / "sft.jsonl").open("w") as f:
        for i in range(64):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            row = ({"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{a}+{b}?"},
                                 {"role": "assistant", "content": "Yes."}]} if i % 2
                   else {"prompt": f"{a}+{b}=", "response": "Yes."})
            f.write(json.dumps(row) + "\n")
    run_launcher(["launch/sft.py", "model.preset=debug", *TINY, "train.batch_size=8", "train.micro_batch_size=8",
                  f"tokenizer.name={d / 'tok.json'}", f"sft.data={d / 'sft.jsonl'}", "sft.eval_fraction=0",
                  "optim.warmup_steps=0", "optim.schedule=constant", "optim.lr=1e-2", "eval.interval=0",
                  "train.max_steps=30", f"out_dir={d / 'run'}"])
    return d / "run"
