"""tools/checkpoint.py and llm_dist/checkpoint/tools.py on a real checkpoint written by the trainer."""

from __future__ import annotations

import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from llm_dist.checkpoint.tools import (build_from_safetensors, compare_logits, convert, inspect, load_pt,
                                       load_safetensors)
from llm_dist.sample import load_model
from tests.helpers import REPO, run_launcher

sys.path.insert(0, str(REPO / "tools"))
import checkpoint as cli  # noqa: E402  (tools/checkpoint.py)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, prepared_byte_data: Path) -> Path:
    """A 4-step debug run (tied embeddings, fp32) with one checkpoint; about 5 s."""
    out = tmp_path_factory.mktemp("ckpt_tools") / "run"
    run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={out}", f"data.dir={prepared_byte_data}",
                  "train.max_steps=4", "eval.sample_tokens=0", "eval.steps=1", "train.detect_anomaly=false"])
    return out


def _ckpt(run_dir: Path) -> Path:
    return next((run_dir / "checkpoints").glob("step_*"))


def test_inspect_reports_step_config_tensors_and_totals(run_dir: Path, capsys) -> None:
    info = inspect(str(run_dir))  # a run dir resolves to its newest complete checkpoint
    assert info["path"] == str(_ckpt(run_dir)) and info["step"] == 4
    assert (info["world_size"], info["strategy"], info["complete"], info["verify"]) == (1, "single", True, "ok")
    assert info["tokens_seen"] == 4 * 8 * 64 and info["model"]["n_layer"] == 2 and info["model"]["vocab_size"] == 257
    assert info["tied"] == {"lm_head.weight": "tok_emb.weight"}
    rows = {r["name"]: r for r in info["tensors"]}
    assert rows["model.tok_emb.weight"] == {"name": "model.tok_emb.weight", "group": "model", "shape": [320, 64],
                                           "dtype": "float32", "nbytes": 320 * 64 * 4, "shards": 1}
    assert rows["optim.param_groups.0.lr"]["dtype"] == "bytes"
    model, _, _ = load_model(str(run_dir))
    params = {id(p): p for p in model.parameters()}  # tied parameters once
    t = info["totals"]
    assert t["model_params"] == sum(p.numel() for p in params.values())
    # AdamW: exp_avg + exp_avg_sq per parameter (tied counted once) + one scalar step each, plus the
    # serialised hyper-parameters of the param groups (bytes entries).
    optim_tensors = sum(r["nbytes"] for r in info["tensors"] if r["group"] == "optim" and r["dtype"] != "bytes")
    assert optim_tensors == sum(2 * p.numel() * 4 + 4 for p in params.values())
    assert t["optim_bytes"] == optim_tensors + sum(r["nbytes"] for r in info["tensors"] if r["dtype"] == "bytes")
    assert t["model_bytes"] == sum(r["nbytes"] for r in info["tensors"] if r["group"] == "model")

    assert cli.main(["inspect", str(_ckpt(run_dir)), "--filter", "model.tok_*"]) == 0
    text = capsys.readouterr().out
    assert "step 4 | written by 1 rank(s), strategy single" in text and "verify: ok" in text
    assert "model.tok_emb.weight" in text and "320x64" in text and "model.blocks" not in text
    assert cli.main(["inspect", str(run_dir), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["totals"] == t


def test_consolidate_gives_identical_logits_and_records_tie(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "model.safetensors"
    assert cli.main(["consolidate", str(run_dir), "--out", str(out), "--check"]) == 0
    assert "max |diff| = 0 (ok)" in capsys.readouterr().out
    assert compare_logits(str(run_dir), str(out)) == 0.0
    with safe_open(str(out), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert "lm_head.weight" not in keys and "tok_emb.weight" in keys  # stored once
    assert json.loads(meta["tied"]) == {"lm_head.weight": "tok_emb.weight"} and meta["step"] == "4"
    assert json.loads(meta["config"])["model"]["n_embd"] == 64
    model, cfg = build_from_safetensors(str(out))
    assert model.lm_head.weight is model.tok_emb.weight and cfg.model.vocab_size == 257
    ref, _, _ = load_model(str(run_dir))
    for k, v in ref.state_dict().items():
        assert torch.equal(v, model.state_dict()[k]), k
    info = inspect(str(out))
    assert info["format"] == "safetensors" and info["totals"]["model_params"] == inspect(str(run_dir))["totals"]["model_params"]


def test_convert_round_trips(run_dir: Path, tmp_path: Path) -> None:
    ref = load_model(str(run_dir))[0].state_dict()
    st, pt, st2, pt2 = (tmp_path / n for n in ("a.safetensors", "b.pt", "c.safetensors", "d.pt"))
    convert(str(run_dir), str(st))
    convert(str(st), str(pt))  # safetensors -> plain state dict, tie kept as one shared tensor
    sd = torch.load(pt, weights_only=True)
    assert sd.keys() == ref.keys() and all(torch.equal(sd[k], ref[k]) for k in ref)
    assert sd["lm_head.weight"].data_ptr() == sd["tok_emb.weight"].data_ptr()
    convert(str(pt), str(st2), config=str(run_dir / "config.yaml"))  # a .pt has no config: given explicitly
    back, cfg, _ = load_safetensors(str(st2))
    assert all(torch.equal(back[k], ref[k]) for k in ref) and cfg["model"]["tie_embeddings"] is True
    convert(str(run_dir), str(pt2))  # DCP -> pt directly
    assert all(torch.equal(load_pt(str(pt2))[k], ref[k]) for k in ref)
    half = tmp_path / "half.safetensors"
    s = convert(str(st), str(half), dtype=torch.bfloat16)
    assert s["to"] == "safetensors" and load_safetensors(str(half))[0]["tok_emb.weight"].dtype == torch.bfloat16


def _err(argv: list[str], capsys) -> str:
    assert cli.main(argv) == cli.EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err  # exactly one line
    return err


class _Evil:
    def __reduce__(self):  # unpickling would call print: the restricted readers must refuse it
        return (print, ("PWNED",))


def test_bad_input_is_one_line_naming_the_file(run_dir: Path, tmp_path: Path, capsys) -> None:
    assert "no such file or directory" in _err(["inspect", str(tmp_path / "nope")], capsys)
    (tmp_path / "empty").mkdir()
    assert "no complete checkpoint there" in _err(["consolidate", str(tmp_path / "empty"), "--out", "x.safetensors"], capsys)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    assert f"{junk}: not a safetensors file" in _err(["inspect", str(junk)], capsys)
    evil = tmp_path / "evil.pt"
    torch.save({"w": _Evil()}, evil)
    assert "Unsupported global" in _err(["convert", str(evil), "--out", str(tmp_path / "o.safetensors")], capsys)
    st = tmp_path / "m.safetensors"
    convert(str(run_dir), str(st))
    pt = tmp_path / "m.pt"
    convert(str(st), str(pt))
    assert "has no config; pass --config" in _err(["convert", str(pt), "--out", str(tmp_path / "n.safetensors")], capsys)
    assert "vocab_size=0" in _err(["convert", str(pt), "--out", str(tmp_path / "n.safetensors"), "--config",
                                   str(REPO / "configs/debug.yaml")], capsys)  # unresolved config: caught
    assert "not supported" in _err(["convert", str(run_dir), "--to", "dcp", "--out", str(tmp_path / "d")], capsys)

    # An incomplete copy is inspected (and says so) but never exported; a tampered .metadata is refused.
    bad = tmp_path / "step_00000004"
    shutil.copytree(_ckpt(run_dir), bad)
    (bad / "COMPLETE").unlink()
    assert inspect(str(bad))["complete"] is False
    assert "incomplete (no COMPLETE marker)" in _err(["consolidate", str(bad), "--out", str(tmp_path / "x.safetensors")], capsys)
    (bad / "dcp" / ".metadata.json").unlink()  # a legacy-looking checkpoint: only a pickled index
    (bad / "dcp" / ".metadata").write_bytes(pickle.dumps(_Evil()))
    msg = _err(["inspect", str(bad)], capsys)
    assert "dcp/.metadata: refers to builtins.print, which a checkpoint may not contain" in msg
    assert "PWNED" not in capsys.readouterr().out
