"""SFT with LoRA end to end: 2 DDP ranks and 2 FSDP ranks (with activation checkpointing) equal 1 process;
stop + resume equals an uninterrupted run; the checkpoint holds the adapters and a reference to the base (far
smaller than the model); merge-lora exports a model whose logits equal base + adapters; a missing or changed
base stops a resume with one line, exit 2."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from tests.helpers import final_params, load_tool, run_launcher


@pytest.fixture(scope="module")
def base_and_data(tmp_path_factory, prepared_byte_data):
    d = tmp_path_factory.mktemp("lora_sft")
    run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", "train.max_steps=2", "eval.sample_tokens=0",
                  f"data.dir={prepared_byte_data}", "train.detect_anomaly=false", f"out_dir={d / 'pre'}"])
    rng = random.Random(0)
    with (d / "train.jsonl").open("w") as f:
        for _ in range(48):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b)}) + "\n")
    return d / "pre", d / "train.jsonl"


def _args(base, data, out, *extra):
    return ["launch/sft.py", f"sft.init_from={base}", "model.block_size=32", f"sft.data={data}",
            "sft.eval_fraction=0.25", "sft.eval_examples=0", "train.batch_size=4", "train.micro_batch_size=2",
            "train.dtype=fp32", "train.deterministic=true", "optim.warmup_steps=2", "optim.schedule=constant",
            "optim.lr=1e-2", "parallel.device=cpu", "eval.interval=0", "eval.steps=1", f"out_dir={out}",
            "checkpoint.resume=auto", "model.lora.rank=4", "model.lora.alpha=8", "model.lora.targets=wq,wv,wo,up,down",
            "train.max_steps=4", *extra]


def _tensor_bytes(ckpt_dir) -> int:
    """Bytes of every tensor a checkpoint stores, model and optimizer state (the files add a fixed cost per
    tensor on top, which dominates for models this tiny)."""
    from llm_dist.checkpoint.tools import inspect
    return sum(t["nbytes"] for t in inspect(str(ckpt_dir))["tensors"])


def test_lora_sft_ranks_resume_checkpoint_and_merge(base_and_data, tmp_path):
    base, data = base_and_data
    run_launcher(_args(base, data, tmp_path / "one"))
    run_launcher(_args(base, data, tmp_path / "ddp"), nproc=2)
    run_launcher(_args(base, data, tmp_path / "fsdp", "parallel.strategy=fsdp", "parallel.ac=full"), nproc=2)
    run_launcher(_args(base, data, tmp_path / "res", "checkpoint.interval=2") + ["train.max_steps=2"])
    run_launcher(_args(base, data, tmp_path / "res", "checkpoint.interval=2"))
    one, ddp, fsdp, res = (final_params(tmp_path / n) for n in ("one", "ddp", "fsdp", "res"))
    pre = final_params(base)
    for k in one:
        torch.testing.assert_close(ddp[k], one[k], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fsdp[k], one[k], atol=1e-5, rtol=1e-5)
        assert torch.equal(res[k], one[k]), k
        if ".lora_" not in k and k in pre and k not in ("tok_emb.weight", "lm_head.weight"):  # vocab grew by 4
            assert torch.equal(one[k], pre[k]), k  # the base stayed frozen
    assert one["blocks.0.attn.wq.lora_B"].abs().max() > 0  # the adapters trained

    ck = tmp_path / "one" / "checkpoints" / "step_00000004"
    meta = json.loads((ck / "meta.json").read_text())
    base_ck = base / "checkpoints" / "step_00000002"
    assert meta["lora_base"]["url"] == str(base_ck)
    from llm_dist.checkpoint.tools import read_dcp_metadata
    keys = [k for k in read_dcp_metadata(str(ck)).state_dict_metadata if k.startswith("model.")]
    assert keys and all(".lora_" in k for k in keys)  # no base weight (nor the tied embedding alias)
    assert _tensor_bytes(ck) < 0.1 * _tensor_bytes(base_ck)

    # merge-lora: the exported model's logits equal base + adapters (--check: max |diff| <= 1e-5, else exit 1)
    tool = load_tool("checkpoint")
    out = tmp_path / "merged.safetensors"
    assert tool.main(["merge-lora", str(tmp_path / "one"), "--out", str(out), "--check"]) == 0
    from llm_dist.checkpoint.tools import build_from_safetensors
    from llm_dist.lora_checkpoint import compare_merged
    merged, cfg = build_from_safetensors(str(out))
    assert cfg.model.lora.rank == 0 and compare_merged(str(tmp_path / "one"), str(out), seed=1) <= 1e-5
    assert not torch.equal(merged.blocks[0].attn.wq.weight, pre["blocks.0.attn.wq.weight"])
    assert tool.main(["consolidate", str(tmp_path / "one"), "--out", str(tmp_path / "x.safetensors")]) == 2

    # the base is gone: resuming stops with one line naming it, exit 2, and touches nothing
    moved = base.parent / "pre_moved"
    shutil.move(base, moved)
    try:
        p = run_launcher(_args(moved, data, tmp_path / "res", "train.max_steps=6"), check=False)
    finally:
        shutil.move(moved, base)
    err = [line for line in p.stderr.splitlines() if line.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and "LoRA adapters of the base" in err[0] and str(base_ck) in err[0]
    assert not (tmp_path / "res" / "checkpoints" / "step_00000006").exists()


def test_lora_needs_an_init_checkpoint(base_and_data, tmp_path):
    base, data = base_and_data
    p = run_launcher(_args("", data, tmp_path / "x"), check=False)
    assert p.returncode == 2 and "set the stage's init_from" in p.stderr
