"""init_from=<Hugging Face folder> through the real launchers: HF -> SFT 5 steps (2 FSDP ranks) -> export -> transformers loads it
with the project's logits and stops `generate` at eos; pretraining, reward, GRPO and PPO start from HF folders;
a bad folder is one line, exit 2."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import read_metrics, run_launcher
from tests.hub.hf_models import TEXT, save_hf_folder

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

COMMON = ["train.dtype=fp32", "train.deterministic=true", "train.log_interval=1", "optim.warmup_steps=0",
          "optim.schedule=constant", "optim.lr=3e-3", "parallel.device=cpu", "eval.interval=0"]


@pytest.fixture(scope="module")
def sft_rows(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("rows") / "sft.jsonl"
    with path.open("w") as f:
        for _ in range(24):
            a, b = rng.randint(0, 99), rng.randint(0, 99)
            f.write(json.dumps({"prompt": f"{a}+{b}=", "response": str(a + b),
                                "chosen": str(a + b), "rejected": str(a + b + 1)}) + "\n")
    return path


def test_hf_to_sft_to_hf_round_trip(tmp_path: Path, sft_rows: Path):
    from llm_dist.hub.export import export_hf
    from llm_dist.model import generate
    from llm_dist.sample import load_model
    from llm_dist.sft.chat import prompt_ids
    from llm_dist.tokenizer import HFTokenizer

    # vocab 300 = the tokenizer's: the 4 chat tokens grow the embedding (tied, Qwen2 q/k/v biases); the
    # HF weights go onto 2 FSDP ranks' shards
    hf0 = save_hf_folder("qwen2_tied", tmp_path / "hf", vocab=300)
    run_launcher(["launch/sft.py", f"sft.init_from={tmp_path / 'hf'}", f"sft.data={sft_rows}", "model.block_size=32",
                  "sft.eval_fraction=0.25", "sft.eval_examples=0", "train.batch_size=4", "train.micro_batch_size=2",
                  "train.max_steps=5", "parallel.strategy=fsdp", f"out_dir={tmp_path / 'sft'}", *COMMON], nproc=2)
    model, tok, cfg = load_model(str(tmp_path / "sft"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 304 == cfg.model.vocab_size
    assert cfg.model.qkv_bias and cfg.model.tie_embeddings and cfg.model.block_size == 32
    trained = model.tok_emb.weight[:300].detach()
    assert not torch.allclose(trained, hf0.model.embed_tokens.weight)  # it trained
    torch.testing.assert_close(trained, hf0.model.embed_tokens.weight, atol=0.05, rtol=0)  # from the HF weights
    summary = export_hf(str(tmp_path / "sft"), tmp_path / "out")  # the export users run: weights + tokenizer + ids
    # transformers 5 forces Qwen2Tokenizer (Qwen's own pre-tokenizer regex) for model_type qwen2, and this
    # test tokenizer splits like GPT-2: the export says so, and PreTrainedTokenizerFast reads the file as is
    assert "Qwen2Tokenizer" in summary["warning"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    hf_tok = transformers.PreTrainedTokenizerFast.from_pretrained(tmp_path / "out")
    ids = tok.encode_ordinary(TEXT[1])
    assert hf_tok(TEXT[1], add_special_tokens=False)["input_ids"] == ids
    msgs = [{"role": "user", "content": "2+3="}]
    assert hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False) == prompt_ids(tok, msgs)
    end = tok.special_tokens["<|end|>"]
    assert hf.generation_config.eos_token_id[0] == end and hf_tok.eos_token == "<|end|>"
    idx = torch.tensor([ids])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[:, :, :304], atol=1e-5, rtol=1e-5)
        free = generate(model, idx, 12, temperature=0.0)[0, len(ids):].tolist()  # greedy, no stop
        eos = free[3]  # a token greedy decoding reaches: HF must stop right after its first occurrence
        stop = free.index(eos) + 1
        out = hf.generate(idx, max_new_tokens=12, do_sample=False, eos_token_id=eos, pad_token_id=eos)
        ours = generate(model, idx, 12, temperature=0.0, eos_id=eos)[0, len(ids):].tolist()
    assert out[0, len(ids):].tolist() == free[:stop] == ours[:stop]


def test_pretrain_reward_grpo_ppo_start_from_hf_folders(tmp_path: Path, sft_rows: Path):
    from llm_dist.checkpoint import load_checkpoint_tokenizer
    from llm_dist.sample import resolve_checkpoint
    from llm_dist.tokenizer import HFTokenizer

    save_hf_folder("llama3", tmp_path / "llama")  # rope_type llama3
    save_hf_folder("gpt2", tmp_path / "gpt2")
    repo = tmp_path / "models--org--mistral"
    save_hf_folder("mistral", repo / "snapshots" / "0123abcd")  # a hub cache layout
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    (tmp_path / "text.txt").write_text("\n\n".join(TEXT * 40))
    run_launcher(["launch/pretrain.py", f"checkpoint.init_from={tmp_path / 'llama'}", f"data.source={tmp_path / 'text.txt'}",
                  f"data.dir={tmp_path / 'data'}", "model.block_size=16", "train.batch_size=2", "train.micro_batch_size=2",
                  "train.max_steps=2", "eval.sample_tokens=0", f"out_dir={tmp_path / 'pre'}", *COMMON])
    url = resolve_checkpoint(str(tmp_path / "pre"))
    assert isinstance(load_checkpoint_tokenizer(url), HFTokenizer) and (Path(url) / "hf_tokenizer.json").is_file()
    run_launcher(["launch/reward.py", f"reward.init_from={tmp_path / 'gpt2'}", f"reward.data={sft_rows}",
                  "model.block_size=32", "train.batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
                  f"out_dir={tmp_path / 'rm'}", *COMMON])
    rl = ["rl.task_level=1", "rl.max_new_tokens=3", "rl.eval_examples=0", "train.batch_size=4",
          "train.micro_batch_size=4", "train.max_steps=1", "model.block_size=32", *COMMON]
    run_launcher(["launch/grpo.py", f"rl.init_from={repo}", "rl.group_size=2", "rl.beta=0.05", f"out_dir={tmp_path / 'grpo'}", *rl])
    run_launcher(["launch/ppo.py", f"rl.init_from={tmp_path / 'llama'}", "rl.group_size=1", f"out_dir={tmp_path / 'ppo'}", *rl])
    for run, key in (("pre", "loss"), ("rm", "loss"), ("grpo", "reward_mean"), ("ppo", "pg_loss")):
        assert any(key in r for r in read_metrics(tmp_path / run)), run
    grpo = yaml.safe_load((tmp_path / "grpo" / "config.yaml").read_text())["model"]  # the snapshot's Mistral
    assert grpo["attn"]["window"] == 5 and grpo["n_kv_head"] == 2 and grpo["block_size"] == 32
    pre = yaml.safe_load((tmp_path / "pre" / "config.yaml").read_text())
    assert pre["model"]["rope_scaling"]["type"] == "llama3" and pre["tokenizer"]["name"] == str(tmp_path / "llama")


def test_bad_hf_folder_is_one_line_exit_2(tmp_path: Path, sft_rows: Path, capsys):
    # In process, through the launchers' own entry point (`cli.run`: parsing, the stage, one-line errors).
    from llm_dist.cli import run
    from llm_dist.rl.stage import main as grpo_main
    from llm_dist.sft.stage import main as sft_main

    save_hf_folder("llama3", tmp_path / "hf")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    capsys.readouterr()
    assert run(sft_main, [f"sft.init_from={tmp_path / 'hf'}", f"sft.data={sft_rows}", "parallel.device=cpu",
                          f"out_dir={tmp_path / 'o'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "rope_type='yarn' is not supported" in err[0] and str(tmp_path / "hf") in err[0]
    # a folder with neither a checkpoint nor config.json, and a model key that contradicts config.json
    assert run(grpo_main, [f"rl.init_from={tmp_path}", "parallel.device=cpu", f"out_dir={tmp_path / 'o2'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nor a Hugging Face model folder" in err[0]
    save_hf_folder("gpt2", tmp_path / "gpt2")
    capsys.readouterr()
    assert run(sft_main, [f"sft.init_from={tmp_path / 'gpt2'}", f"sft.data={sft_rows}", "model.n_layer=6",
                          "model.pos_emb=rope", "parallel.device=cpu", f"out_dir={tmp_path / 'o3'}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop model.n_layer=6 (the model has 2); model.pos_emb='rope'" in err[0]
