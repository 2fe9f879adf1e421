"""Bad input, everywhere: one line on stderr naming the key/file/value, exit status 2, nothing changed.

Every case runs a real entry point (launch/*.py, tools/*.py) with bad input and asserts
- exit status 2;
- stderr, blank lines dropped, is exactly one line, and it contains `expect` (the key, file or value);
- no "Traceback" anywhere in stdout or stderr;
- every pre-existing file in play is byte-identical afterwards and no file appeared or vanished: the
  session's "world" (a prepared data dir, a run dir with a checkpoint of a tiny run, a tokenizer file,
  config files, the source corpus) and the case's own directory (whatever `setup` wrote into it).

Speed. A subprocess costs 1.5-3 s of interpreter + torch import, so most cases run the script in this
process: `runpy.run_path(script, run_name="__main__")` with sys.argv set executes the very `__main__` block a
subprocess would (argument parsing, `llm_dist.cli.run`, the tool's error wrapper), with stdout/stderr
captured and SystemExit read as the exit status. Cases marked `subprocess=True` (at least one per entry
point) run as real processes, which also catches anything printed at import time or by the interpreter, and
Python warnings: in this process pytest collects those into its warnings summary instead of stderr.
CUDA is hidden from both (CUDA_VISIBLE_DEVICES="" for a subprocess, torch.cuda.is_available patched to False
in this process), so "device cuda without CUDA" cases mean the same on a GPU machine.

Adding cases: append a `Case` to CASES (`copy_data` / `copy_run` give a case its own damaged copy of the
world's prepared dir / run dir). `argv[0]` is a script path relative to the repository root; the
placeholders {world}, {run}, {data}, {src}, {tok}, {cfg} (the session's world) and {tmp} (the case's own
directory, where `setup(tmp, world)` may write bad files first) are filled in argv and in `expect`.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch

from tests.helpers import REPO, cpu_env

TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "train.batch_size=4",
        "train.micro_batch_size=4", "train.max_steps=1", "eval.steps=1", "eval.sample_tokens=0",
        "out_dir={run}", "data.dir={data}", "data.source={src}"]


@dataclass(frozen=True)
class World:
    """Pre-existing things the cases point at (built once per session, checked unchanged after each case)."""

    root: Path

    def fmt(self, s: str, tmp: Path) -> str:
        return s.format(world=self.root, run=self.root / "run", data=self.root / "data", src=self.root / "src.txt",
                        tok=self.root / "tok.json", cfg=self.root / "good.yaml", tmp=tmp)


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # script (relative to the repo root), then its arguments; placeholders as in the module doc
    expect: str  # substring of the one stderr line
    setup: Callable[[Path, World], None] | None = None  # writes the case's bad files into its own directory
    subprocess: bool = False  # run as a real process (else runpy in this process)
    env: dict[str, str] = field(default_factory=dict)  # extra environment (subprocess cases only)


# --------------------------------------------------------------------------------------------------------
# setup helpers: each writes into the case's directory `tmp`, never into the world


def write(name: str, content: str | bytes) -> Callable[[Path, World], None]:
    def setup(tmp: Path, world: World) -> None:
        p = tmp / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content if isinstance(content, bytes) else content.encode())

    return setup


def copy_data(damage: Callable[[Path], None]) -> Callable[[Path, World], None]:
    """A copy of the world's prepared dir at tmp/data, then `damage(copy)`."""

    def setup(tmp: Path, world: World) -> None:
        shutil.copytree(world.root / "data", tmp / "data")
        damage(tmp / "data")

    return setup


def copy_run(damage: Callable[[Path], None]) -> Callable[[Path, World], None]:
    """A copy of the world's run dir (config.yaml, metrics, a checkpoint) at tmp/run, then `damage(copy)`:
    for cases about a run's or checkpoint's files, which must not touch the world's run."""

    def setup(tmp: Path, world: World) -> None:
        shutil.copytree(world.root / "run", tmp / "run")
        damage(tmp / "run")

    return setup


def truncate_val(d: Path) -> None:
    p = d / "val_000000.bin"
    p.write_bytes(p.read_bytes()[:100])


def ids_past_vocab(d: Path) -> None:
    p = d / "val_000000.bin"
    a = np.fromfile(p, dtype=np.uint16)
    a[7] = 9999  # the byte tokenizer has 257 ids
    a.tofile(p)


def edit_index(**fields: object) -> Callable[[Path], None]:
    def damage(d: Path) -> None:
        index = json.loads((d / "index.json").read_text())
        index.update(fields)
        (d / "index.json").write_text(json.dumps(index))

    return damage


def _ckpt(run: Path) -> Path:
    return next((run / "checkpoints").iterdir())


def flip_shard(run: Path) -> None:
    """Same-size damage inside the checkpoint's shard file: only the checksums can see it."""
    shard = next((_ckpt(run) / "dcp").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2: len(data) // 2 + 64] = b"\xff" * 64
    shard.write_bytes(bytes(data))


def reseal(rel: str, content: bytes) -> Callable[[Path], None]:
    """Replace a checkpoint file and its recorded size and CRCs in meta.json (what someone able to write the
    checkpoint can do), so the file's content itself must be refused."""
    import zlib

    def damage(run: Path) -> None:
        ck = _ckpt(run)
        (ck / rel).write_bytes(content)
        meta = json.loads((ck / "meta.json").read_text())
        meta["files"][rel] = len(content)
        meta["checksums"]["files"][rel] = [f"{zlib.crc32(content) & 0xFFFFFFFF:08x}"]
        (ck / "meta.json").write_text(json.dumps(meta))

    return damage


def lock_held_elsewhere(run: Path) -> None:
    (run / ".lock").write_text(json.dumps({"host": "node7", "pid": 4242, "started": 0, "job": None}))


RESUME = ["launch/pretrain.py", *TINY, "out_dir={tmp}/run", "train.max_steps=2"]

SFT_ROW = '{"prompt": "1+1=", "response": "2"}\n'
PAIR_ROW = '{"prompt": "1+1=", "chosen": "2", "rejected": "3"}\n'
NOT_UTF8 = b'{"prompt": "caf\xe9", "response": "x"}\n'

CASES: list[Case] = [
    # ---- config values and keys (launch/pretrain.py unless said otherwise) --------------------------
    Case("lr-nan", ["launch/pretrain.py", *TINY, "optim.lr=nan"], "optim.lr"),
    Case("lr-inf", ["launch/pretrain.py", *TINY, "optim.lr=inf"], "optim.lr: expected a finite number"),
    Case("dropout-neg-inf", ["launch/pretrain.py", *TINY, "model.dropout=-inf"], "model.dropout"),
    Case("yaml-nan", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "ppo.gamma",
         write("c.yaml", "ppo:\n  gamma: .nan\n")),
    Case("yaml-inf-int", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "train.max_steps",
         write("c.yaml", "train:\n  max_steps: .inf\n")),
    Case("unknown-key", ["launch/pretrain.py", *TINY, "optim.lrr=1"], "optim.lrr"),
    Case("unknown-section", ["launch/pretrain.py", *TINY, "optimizer.lr=1"], "optimizer"),
    Case("int-garbage", ["launch/pretrain.py", *TINY, "train.max_steps=abc"], "train.max_steps"),
    Case("bool-garbage", ["launch/pretrain.py", *TINY, "train.compile=maybe"], "train.compile"),
    Case("heads-divide", ["launch/pretrain.py", *TINY, "model.n_head=3"], "model.n_head=3"),
    Case("batch-divide", ["launch/pretrain.py", *TINY, "train.batch_size=6"], "train.batch_size=6"),
    Case("seed-negative", ["launch/pretrain.py", *TINY, "train.seed=-1"], "train.seed"),
    Case("moe-top-k-negative", ["launch/pretrain.py", *TINY, "model.moe.top_k=-1"], "model.moe.top_k"),
    Case("val-fraction", ["launch/pretrain.py", *TINY, "data.val_fraction=1.5"], "data.val_fraction"),
    Case("num-proc-0", ["launch/pretrain.py", *TINY, "data.num_proc=0"], "data.num_proc"),
    Case("section-as-value", ["launch/pretrain.py", *TINY, "model=3"], "model is a section"),
    Case("no-equals", ["launch/pretrain.py", *TINY, "optim.lr"], "'optim.lr'"),
    Case("unknown-option", ["launch/pretrain.py", *TINY, "--bogus"], "--bogus"),
    Case("device-tpu", ["launch/pretrain.py", *TINY, "parallel.device=tpu"], "parallel.device"),
    Case("device-cuda-missing", ["launch/pretrain.py", *TINY, "parallel.device=cuda"],
         "parallel.device=cuda but CUDA is not available", subprocess=True),
    Case("out-dir-proc", ["launch/pretrain.py", *TINY, "out_dir=/proc/llm_dist_run"], "/proc/llm_dist_run"),
    Case("out-dir-is-file", ["launch/pretrain.py", *TINY, "out_dir={src}"], "out_dir: {src} exists"),
    Case("out-dir-under-file", ["launch/pretrain.py", *TINY, "out_dir={src}/run"], "{src} is a file"),
    Case("checkpoint-dir-proc", ["launch/pretrain.py", *TINY, "checkpoint.dir=/proc/llm_dist_ckpt"],
         "checkpoint.dir: /proc/llm_dist_ckpt"),
    Case("source-no-backend", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.source=nosuchfs://b/a.txt"],
         "nosuchfs://b/a.txt"),
    Case("tokenizer-unknown", ["launch/pretrain.py", *TINY, "tokenizer.name=gtp2"], "unknown tokenizer 'gtp2'"),
    Case("tokenizer-truncated", ["launch/pretrain.py", *TINY, "tokenizer.name={tmp}/tok.json"], "{tmp}/tok.json",
         write("tok.json", '{"format": "llm_dist.bpe", "vers')),
    Case("tokenizer-mismatch", ["launch/pretrain.py", *TINY, "tokenizer.name={tok}"], "another tokenizer"),
    Case("source-missing-no-data", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.source={tmp}/no.txt"],
         "data.source {tmp}/no.txt: input file not found"),
    Case("data-damaged-source-missing",
         ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.source={tmp}/no.txt"],
         "data.dir {tmp}/data is damaged", copy_data(truncate_val)),
    Case("corpus-12-bytes", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.source={tmp}/tiny.txt"],
         "too little text", write("tiny.txt", "hello world!")),
    Case("val-ids-past-vocab", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data"],
         "{tmp}/data/val_000000.bin: token id 9999", copy_data(ids_past_vocab)),
    Case("index-splits-garbage", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.source={tmp}/no.txt"],
         "{tmp}/data/index.json: malformed index", copy_data(edit_index(splits=3))),
    Case("index-shard-path-escape", ["launch/evaluate.py", "--checkpoint", "{run}", "--data-dir", "{tmp}/data"],
         "'../src.txt', not a shard file name",
         copy_data(edit_index(splits={"val": {"tokens": 5, "shards": [{"file": "../src.txt", "tokens": 5}]}}))),
    Case("block-size-over-data", ["launch/pretrain.py", *TINY, "model.block_size=100000"], "fewer than seq_len + 1"),
    Case("mc-data-missing", ["launch/pretrain.py", *TINY, "eval.mc_data={tmp}/mc.jsonl"], "{tmp}/mc.jsonl"),
    # ---- config files ------------------------------------------------------------------------------
    Case("config-missing", ["launch/pretrain.py", "--config", "{tmp}/none.yaml", *TINY], "{tmp}/none.yaml"),
    Case("config-duplicate-key", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "duplicate key 'lr'",
         write("c.yaml", "optim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")),
    Case("config-duplicate-section", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY],
         "duplicate key 'optim'", write("c.yaml", "optim:\n  lr: 1.0e-3\ntrain:\n  seed: 1\noptim:\n  beta1: 0.8\n")),
    Case("config-invalid-yaml", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "{tmp}/c.yaml line 3",
         write("c.yaml", "optim:\n  lr: [1, 2\n")),
    Case("config-not-utf8", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "{tmp}/c.yaml",
         write("c.yaml", b"optim:\n  lr: 1\xff\n")),
    Case("config-list", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "expected a mapping",
         write("c.yaml", "- a\n- b\n")),
    Case("config-section-scalar", ["launch/pretrain.py", "--config", "{tmp}/c.yaml", *TINY], "optim",
         write("c.yaml", "optim: 3\n")),
    Case("config-no-path", ["launch/pretrain.py", *TINY, "--config"], "--config"),
    Case("config-is-dir", ["launch/pretrain.py", "--config", "{world}", *TINY], "{world}: is a directory"),
    Case("config-good-but-bad-override", ["launch/pretrain.py", "--config", "{cfg}", *TINY, "optim.beta2=1.0"],
         "optim.beta2"),
    Case("data-dir-is-file", ["launch/pretrain.py", *TINY, "data.dir={src}"], "{src} exists and is not a directory"),
    Case("tokenizer-binary", ["launch/pretrain.py", *TINY, "tokenizer.name={tmp}/t.json"], "{tmp}/t.json",
         write("t.json", bytes(range(256)) * 4)),
    # ---- post-training stages: JSONL rows ----------------------------------------------------------
    Case("sft-not-utf8", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl:2: not valid UTF-8 (invalid continuation byte at byte offset 51",
         write("d.jsonl", SFT_ROW.encode() + NOT_UTF8), subprocess=True),
    Case("sft-missing", ["launch/sft.py", *TINY, "sft.data={tmp}/none.jsonl"], "{tmp}/none.jsonl"),
    Case("sft-bad-json", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl:2",
         write("d.jsonl", SFT_ROW + '{"prompt": \n')),
    Case("sft-bad-row", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl:1",
         write("d.jsonl", '{"question": 3}\n')),
    Case("sft-messages-not-list", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl:1: key 'messages'",
         write("d.jsonl", '{"messages": "hi"}\n')),
    Case("sft-role", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl:1: messages[0].role",
         write("d.jsonl", '{"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]}\n')),
    Case("sft-difficulty", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl", "sft.curriculum=difficulty"],
         "key 'difficulty'", write("d.jsonl", '{"question": "a", "answer": "b", "difficulty": "hard"}\n')),
    Case("sft-empty", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl"], "{tmp}/d.jsonl", write("d.jsonl", "\n\n")),
    Case("sft-eval-fraction-nan", ["launch/sft.py", *TINY, "sft.data={tmp}/d.jsonl", "sft.eval_fraction=nan"],
         "sft.eval_fraction", write("d.jsonl", SFT_ROW)),
    Case("reward-not-utf8", ["launch/reward.py", *TINY, "reward.data={tmp}/p.jsonl"], "{tmp}/p.jsonl:1",
         write("p.jsonl", b'{"prompt": "\xc3", "chosen": "a", "rejected": "b"}\n'), subprocess=True),
    Case("reward-missing-field", ["launch/reward.py", *TINY, "reward.data={tmp}/p.jsonl"], "{tmp}/p.jsonl:2",
         write("p.jsonl", PAIR_ROW + '{"prompt": "x", "chosen": "y"}\n')),
    Case("reward-row-margin-nan", ["launch/reward.py", *TINY, "reward.data={tmp}/p.jsonl"], "key 'margin'",
         write("p.jsonl", '{"prompt": "a", "chosen": "b", "rejected": "c", "margin": NaN}\n')),
    Case("reward-margin-inf", ["launch/reward.py", *TINY, "reward.data={tmp}/p.jsonl", "reward.margin=inf"],
         "reward.margin", write("p.jsonl", PAIR_ROW)),
    Case("dpo-missing-field", ["launch/dpo.py", *TINY, "dpo.data={tmp}/p.jsonl"], "{tmp}/p.jsonl:2",
         write("p.jsonl", PAIR_ROW + '{"prompt": "x", "rejected": "y"}\n')),
    Case("dpo-loss", ["launch/dpo.py", *TINY, "dpo.data={tmp}/p.jsonl", "dpo.loss=kto"], "dpo.loss",
         write("p.jsonl", PAIR_ROW), subprocess=True),
    Case("grpo-task", ["launch/grpo.py", *TINY, "rl.task=sudoku"], "rl.task", subprocess=True),
    Case("grpo-temperature-nan", ["launch/grpo.py", *TINY, "rl.temperature=nan"], "rl.temperature"),
    Case("grpo-gsm8k-missing", ["launch/grpo.py", *TINY, "rl.task=gsm8k", "rl.data_dir={tmp}/gsm8k",
                                "train.batch_size=8", "train.micro_batch_size=8"], "rl.task"),
    Case("ppo-cliprange", ["launch/ppo.py", *TINY, "ppo.cliprange=1.5"], "ppo.cliprange", subprocess=True),
    Case("ppo-gamma-nan", ["launch/ppo.py", *TINY, "ppo.gamma=nan"], "ppo.gamma"),
    # ---- tools/prepare_data.py ---------------------------------------------------------------------
    Case("prep-tokenizer-truncated", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "-t", "{tmp}/t.json"],
         "{tmp}/t.json", write("t.json", '{"format": "llm_dist.bpe", "version": 1, "ranks": ["AA=='), subprocess=True),
    Case("prep-tokenizer-unknown", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "-t", "nosuch"],
         "'nosuch'"),
    Case("prep-out-is-file", ["tools/prepare_data.py", "-i", "{src}", "-o", "{src}"], "{src} exists and is not a directory"),
    Case("prep-out-proc", ["tools/prepare_data.py", "-i", "{src}", "-o", "/proc/llm_dist_data"], "/proc/llm_dist_data"),
    Case("prep-num-proc-0", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "--num-proc", "0"], "--num-proc"),
    Case("prep-num-proc-huge", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "--num-proc", "100000"],
         "got 100000"),
    Case("data-num-proc-huge", ["launch/pretrain.py", *TINY, "data.dir={tmp}/data", "data.num_proc=100000"],
         "got 100000"),
    Case("prep-shard-tokens-neg", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "--shard-tokens", "-1"],
         "--shard-tokens"),
    Case("prep-val-fraction-nan", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "--val-fraction", "nan"],
         "--val-fraction"),
    Case("prep-progress-inf", ["tools/prepare_data.py", "-i", "{src}", "-o", "{tmp}/out", "--progress-every", "inf"],
         "--progress-every"),
    Case("prep-12-bytes", ["tools/prepare_data.py", "-i", "{tmp}/tiny.txt", "-o", "{tmp}/out"],
         "train 11, val 3 tokens", write("tiny.txt", "hello world!")),
    Case("prep-input-bad-url", ["tools/prepare_data.py", "-i", "nosuchfs://b/a.txt", "-o", "{tmp}/out"],
         "nosuchfs://b/a.txt: cannot open it"),
    Case("prep-input-missing", ["tools/prepare_data.py", "-i", "{tmp}/none.txt", "-o", "{tmp}/out"], "{tmp}/none.txt"),
    Case("prep-not-utf8", ["tools/prepare_data.py", "-i", "{tmp}/x.txt", "-o", "{tmp}/out"], "{tmp}/x.txt: not valid UTF-8 (invalid start byte at byte offset 3 ",
         write("x.txt", b"abc\xff" * 100)),
    Case("prep-jsonl-not-utf8", ["tools/prepare_data.py", "-i", "{tmp}/x.jsonl", "-o", "{tmp}/out"],
         "{tmp}/x.jsonl:2: not valid UTF-8 (invalid continuation byte at byte offset 28 ",
         write("x.jsonl", b'{"text": "ok"}\n{"text": "caf\xe9"}\n')),
    Case("prep-jsonl-field", ["tools/prepare_data.py", "-i", "{tmp}/x.jsonl", "-o", "{tmp}/out"], "--text-field",
         write("x.jsonl", '{"content": "hello"}\n')),
    Case("prep-other-inputs", ["tools/prepare_data.py", "-i", "{tmp}/other.txt", "-o", "{data}"],
         "holds data prepared from different inputs", write("other.txt", "To be, or not to be\n" * 50)),
    Case("prep-missing-out", ["tools/prepare_data.py", "-i", "{src}"], "--out"),
    # ---- tools/train_tokenizer.py ------------------------------------------------------------------
    Case("tok-vocab-0", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "0", "--out", "{tmp}/t.json"],
         "--vocab-size", subprocess=True),
    Case("tok-vocab-small", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "100", "--out", "{tmp}/t.json"],
         "--vocab-size 100"),
    Case("tok-input-missing", ["tools/train_tokenizer.py", "{tmp}/no*.txt", "--vocab-size", "300", "--out", "{tmp}/t.json"],
         "no*.txt"),
    Case("tok-out-dir", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "300", "--out", "{world}"], "--out {world}"),
    Case("tok-not-utf8", ["tools/train_tokenizer.py", "{tmp}/x.txt", "--vocab-size", "300", "--out", "{tmp}/t.json"],
         "{tmp}/x.txt: not valid UTF-8 (invalid start byte at byte offset 5)", write("x.txt", b"hello\xff world")),
    Case("tok-num-proc-huge", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "300", "--out", "{tmp}/t.json",
                               "--num-proc", "100000"], "--num-proc 100000"),
    Case("tok-pattern", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "300", "--out", "{tmp}/t.json",
                         "--pattern", "("], "--pattern"),
    Case("tok-num-proc", ["tools/train_tokenizer.py", "{src}", "--vocab-size", "300", "--out", "{tmp}/t.json",
                          "--num-proc", "0"], "--num-proc"),
    # ---- launch/generate.py ------------------------------------------------------------------------
    Case("gen-temperature-nan", ["launch/generate.py", "--checkpoint", "{run}", "--temperature", "nan"], "--temperature"),
    Case("gen-max-new-neg", ["launch/generate.py", "--checkpoint", "{run}", "--max-new-tokens", "-5"], "--max-new-tokens"),
    Case("gen-top-p", ["launch/generate.py", "--checkpoint", "{run}", "--top-p", "1.5"], "--top-p"),
    Case("gen-top-k", ["launch/generate.py", "--checkpoint", "{run}", "--top-k", "-1"], "--top-k"),
    Case("gen-num-samples", ["launch/generate.py", "--checkpoint", "{run}", "--num-samples", "0"], "--num-samples"),
    Case("gen-seed", ["launch/generate.py", "--checkpoint", "{run}", "--seed", "x"], "--seed"),
    Case("gen-device-tpu", ["launch/generate.py", "--checkpoint", "{run}", "--device", "tpu"], "'tpu'"),
    Case("gen-device-cuda", ["launch/generate.py", "--checkpoint", "{run}", "--device", "cuda"],
         "--device=cuda but CUDA is not available", subprocess=True),
    Case("gen-no-checkpoint", ["launch/generate.py", "--checkpoint", "{tmp}/none"], "{tmp}/none"),
    # ---- launch/evaluate.py ------------------------------------------------------------------------
    Case("eval-device-tpu", ["launch/evaluate.py", "--checkpoint", "{run}", "--device", "tpu"], "'tpu'"),
    Case("eval-device-cuda", ["launch/evaluate.py", "--checkpoint", "{run}", "--device", "cuda"],
         "--device=cuda but CUDA is not available", subprocess=True),
    Case("eval-steps", ["launch/evaluate.py", "--checkpoint", "{run}", "--steps", "-1"], "--steps"),
    Case("eval-batch-size", ["launch/evaluate.py", "--checkpoint", "{run}", "--batch-size", "0"], "--batch-size"),
    Case("eval-mc-batch-size", ["launch/evaluate.py", "--checkpoint", "{run}", "--mc-batch-size", "1e3"],
         "--mc-batch-size"),
    Case("eval-out-proc", ["launch/evaluate.py", "--checkpoint", "{run}", "--out", "/proc/llm_dist_eval.json"],
         "/proc/llm_dist_eval.json"),
    Case("eval-out-dir", ["launch/evaluate.py", "--checkpoint", "{run}", "--out", "{world}"], "--out {world}"),
    Case("eval-mc-not-utf8", ["launch/evaluate.py", "--checkpoint", "{run}", "--mc", "{tmp}/mc.jsonl"],
         "{tmp}/mc.jsonl:1: not valid UTF-8", write("mc.jsonl", b'{"ctx": "\xff"}\n')),
    Case("eval-mc-endings", ["launch/evaluate.py", "--checkpoint", "{run}", "--mc", "{tmp}/mc.jsonl", "--no-lm"],
         "{tmp}/mc.jsonl:1: 'endings'", write("mc.jsonl", '{"ctx": "a", "endings": "xy", "label": 0}\n')),
    Case("eval-data-dir-missing", ["launch/evaluate.py", "--checkpoint", "{run}", "--data-dir", "{tmp}/none"],
         "{tmp}/none"),
    Case("eval-split-missing", ["launch/evaluate.py", "--checkpoint", "{run}", "--data-dir", "{data}", "--split", "test"],
         "split 'test' not present"),
    Case("eval-ids-past-vocab", ["launch/evaluate.py", "--checkpoint", "{run}", "--data-dir", "{tmp}/data"],
         "{tmp}/data/val_000000.bin: token id 9999", copy_data(ids_past_vocab)),
    Case("eval-nothing", ["launch/evaluate.py", "--checkpoint", "{run}", "--no-lm"], "--no-lm"),
    # ---- tools/checkpoint.py (argument parsing; checkpoint contents are tested in tests/checkpoint) -------
    Case("ckpt-subcommand", ["tools/checkpoint.py", "frobnicate", "{run}"], "'frobnicate'", subprocess=True),
    Case("ckpt-dtype", ["tools/checkpoint.py", "convert", "{run}", "--out", "{tmp}/m.pt", "--dtype", "fp8"], "'fp8'"),
    Case("ckpt-missing-out", ["tools/checkpoint.py", "consolidate", "{run}"], "--out"),
    # ---- checkpoints a run, generate, evaluate or a tool is pointed at (damaged, crafted, missing) -------
    Case("resume-damaged-only", RESUME, "no checkpoint in {tmp}/run/checkpoints can be loaded", copy_run(flip_shard)),
    Case("resume-damaged-subproc", RESUME, "checksum mismatch", copy_run(flip_shard), subprocess=True),
    Case("resume-config-garbage", RESUME, "config.yaml: not a plain YAML mapping",
         copy_run(reseal("config.yaml", b"model: [unclosed\n"))),
    Case("resume-config-tagged", RESUME, "config.yaml: not a plain YAML mapping",
         copy_run(reseal("config.yaml", b"!!python/object/apply:os.system ['touch MARKER']\n"))),
    Case("resume-config-not-mapping", RESUME, "config.yaml: expected a mapping", copy_run(reseal("config.yaml", b"[1]"))),
    Case("resume-tokenizer-garbage", RESUME, "llm_dist_tokenizer.json: not valid JSON",
         copy_run(reseal("llm_dist_tokenizer.json", b"\x00{garbage"))),
    Case("resume-tokenizer-path", RESUME, "'file' must be one of 'llm_dist_tokenizer.bpe.json', 'hf_tokenizer.json'",
         copy_run(reseal("llm_dist_tokenizer.json", json.dumps({"spec": "x", "fingerprint": "y",
                                                       "file": "../../../etc/passwd"}).encode()))),
    Case("resume-train-state", RESUME, "train_state.json: expected a JSON object",
         copy_run(reseal("train_state.json", b"[1, 2]"))),
    Case("resume-rng-garbage", RESUME, "rng/rank_0.pt: unreadable", copy_run(reseal("rng/rank_0.pt", b"not a zip"))),
    Case("resume-meta-garbage", RESUME, "meta.json: unreadable",
         copy_run(lambda run: (_ckpt(run) / "meta.json").write_bytes(b"{nope"))),
    Case("resume-path-missing", ["launch/pretrain.py", *TINY, "checkpoint.resume={tmp}/nope"],
         "checkpoint.resume={tmp}/nope: no such directory"),
    Case("resume-path-empty-dir", ["launch/pretrain.py", *TINY, "out_dir={tmp}/o", "checkpoint.resume={tmp}/e"],
         "checkpoint.resume={tmp}/e: no complete checkpoint there", write("e/x.txt", "not a checkpoint")),
    Case("resume-path-file", ["launch/pretrain.py", *TINY, "out_dir={tmp}/o", "checkpoint.resume={src}"],
         "checkpoint.resume={src}: not a directory"),
    Case("out-dir-locked", RESUME, "is in use by another run (pid 4242 on node7", copy_run(lock_held_elsewhere)),
    Case("gen-ckpt-damaged", ["launch/generate.py", "--checkpoint", "{tmp}/run"], "checksum mismatch",
         copy_run(flip_shard)),
    Case("gen-ckpt-config-tagged", ["launch/generate.py", "--checkpoint", "{tmp}/run"], "not a plain YAML mapping",
         copy_run(reseal("config.yaml", b"!!python/object/apply:os.system ['touch MARKER']\n"))),
    Case("eval-ckpt-damaged", ["launch/evaluate.py", "--checkpoint", "{tmp}/run", "--data-dir", "{data}"],
         "checksum mismatch", copy_run(flip_shard)),
    Case("ckpt-consolidate-damaged", ["tools/checkpoint.py", "consolidate", "{tmp}/run", "--out", "{tmp}/m.st"],
         "checksum mismatch", copy_run(flip_shard)),
    Case("ckpt-export-hf-damaged", ["tools/checkpoint.py", "export-hf", "{tmp}/run", "{tmp}/hf"], "checksum mismatch",
         copy_run(flip_shard)),
    Case("ckpt-export-hf-out-not-empty", ["tools/checkpoint.py", "export-hf", "{run}", "{tmp}/hf"], "hf: folder is not empty",
         lambda tmp, world: ((tmp / "hf").mkdir(), (tmp / "hf" / "x").write_text("keep"))),
    Case("ckpt-export-hf-dtype", ["tools/checkpoint.py", "export-hf", "{run}", "{tmp}/hf", "--dtype", "fp8"], "'fp8'"),
    Case("ckpt-convert-config-dupkey", ["tools/checkpoint.py", "convert", "{tmp}/m.pt", "--out", "{tmp}/m.safetensors",
                                        "--config", "{tmp}/c.yaml"], "c.yaml",
         lambda tmp, world: ((tmp / "m.pt").write_bytes(b"x"), (tmp / "c.yaml").write_text("model: {}\nmodel: {}\n"))),
]


# --------------------------------------------------------------------------------------------------------


def _snapshot(*roots: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under the roots (directories by their listing)."""
    out: dict[str, str] = {}
    for root in roots:
        for p in sorted(root.rglob("*")):
            key = f"{root.name}/{p.relative_to(root)}"
            out[key] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """A source corpus, its prepared dir, a BPE tokenizer file, a valid config and a 1-step run with a checkpoint."""
    from llm_dist.cli import run
    from llm_dist.pretrain import main as pretrain_main
    from llm_dist.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("world")
    text = (REPO / "data/tinyshakespeare/input.txt").read_text(encoding="utf-8")[:40_000]
    (root / "src.txt").write_text(text, encoding="utf-8")
    train_bpe([text], 300, num_proc=1, progress=False).to_tokenizer("tok").save(root / "tok.json")
    (root / "good.yaml").write_text("optim:\n  lr: 1.0e-3\ntrain:\n  max_steps: 1\n")
    w = World(root)
    argv = [w.fmt(a, root) for a in TINY] + ["checkpoint.interval=1", "parallel.device=cpu"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
        rc = run(pretrain_main, argv)
    assert rc == 0, err.getvalue()
    assert (root / "data" / "index.json").is_file() and list((root / "run" / "checkpoints").iterdir())
    return w


def _run(case: Case, argv: list[str]) -> tuple[int, str, str]:
    script = str(REPO / argv[0])
    if case.subprocess:
        p = subprocess.run([sys.executable, script, *argv[1:]], cwd=REPO, env=cpu_env(**case.env),
                           capture_output=True, text=True, timeout=120)
        return p.returncode, p.stdout, p.stderr
    out, err = io.StringIO(), io.StringIO()
    old_argv, old_path = sys.argv, list(sys.path)
    sys.argv = [script, *argv[1:]]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_path(script, run_name="__main__")
                rc = 0
            except SystemExit as e:
                if e.code is None or isinstance(e.code, int):
                    rc = e.code or 0
                else:  # sys.exit("message"): Python prints it to stderr and exits 1
                    print(e.code, file=sys.stderr)
                    rc = 1
            except BaseException:  # noqa: BLE001 - an uncaught exception is what a subprocess shows as a traceback
                import traceback

                traceback.print_exc()
                rc = 1
    finally:
        sys.argv, sys.path[:] = old_argv, old_path
    return rc, out.getvalue(), err.getvalue()


def test_cases_are_many_and_distinct() -> None:
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 50
    scripts = {c.argv[0] for c in CASES if c.subprocess}
    assert {str(p.relative_to(REPO)) for p in (REPO / "launch").glob("*.py")} <= scripts  # every launcher once
    assert {"tools/prepare_data.py", "tools/train_tokenizer.py", "tools/checkpoint.py"} <= scripts


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLM_DIST_EXIT_FILE", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as CUDA_VISIBLE_DEVICES="" for subprocesses
    case_dir = tmp_path / "case"
    case_dir.mkdir()
    if case.setup is not None:
        case.setup(case_dir, world)
    argv = [world.fmt(a, case_dir) for a in case.argv]
    expect = world.fmt(case.expect, case_dir)
    before = _snapshot(world.root, case_dir)

    rc, out, err = _run(case, argv)

    lines = [line for line in err.splitlines() if line.strip()]
    where = f"\n$ {' '.join(argv)}\n--- stdout\n{out[-2000:]}\n--- stderr\n{err[-4000:]}"
    assert "Traceback" not in out + err, where
    assert rc == 2, f"exit status {rc}{where}"
    assert len(lines) == 1, f"stderr has {len(lines)} lines{where}"
    assert expect in lines[0], f"{expect!r} not in the error line{where}"
    after = _snapshot(world.root, case_dir)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert not changed, f"files changed, appeared or vanished: {changed}{where}"


def test_world_is_what_the_cases_assume(world: World) -> None:
    """The fixtures the cases lean on: the prepared dir is byte-tokenized, the run has a tiny model."""
    index = json.loads((world.root / "data" / "index.json").read_text())
    assert index["vocab_size"] == 257 and index["splits"]["val"]["tokens"] > 16 + 1
    assert os.path.getsize(world.root / "src.txt") == 40_000
