"""Config: YAML + dotted overrides, type checks, closest-key hints, invariants, clean CLI failure."""

from __future__ import annotations

from pathlib import Path

import pytest

from llm_dist.config import Config, ConfigError, apply_dict, load_config, parse_args
from tests.helpers import REPO, run_launcher


def test_defaults_validate_and_configs_load() -> None:
    Config().validate(1)
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        cfg.validate(8 if cfg.train.batch_size >= 8 * cfg.train.micro_batch_size else 1)  # multi-GPU recipes at 8


def test_precedence_default_preset_yaml_cli(tmp_path: Path) -> None:
    y = tmp_path / "c.yaml"
    y.write_text("model:\n  preset: gpt2-124M\n  n_layer: 3\noptim:\n  lr: 6.0e-4\n")
    cfg = load_config(str(y), ["optim.lr=1e-3", "model.n_head=4"])
    assert cfg.model.n_embd == 768  # from the preset
    assert cfg.model.n_layer == 3  # YAML beats the preset
    assert cfg.model.n_head == 4 and cfg.optim.lr == 1e-3  # CLI beats YAML
    assert cfg.optim.beta2 == Config().optim.beta2  # untouched default


def test_cli_values_are_typed() -> None:
    cfg = load_config(None, ["train.compile=true", "train.max_steps=1_000", "optim.lr=3e-4", "out_dir=x"])
    assert cfg.train.compile is True and cfg.train.max_steps == 1000 and cfg.optim.lr == pytest.approx(3e-4)


@pytest.mark.parametrize("overrides, message", [
    (["optim.lrr=1"], "did you mean optim.lr?"),
    (["modle.n_layer=2"], "did you mean model?"),
    (["train.compile=maybe"], "train.compile: expected bool"),
    (["train.max_steps=1.5"], "train.max_steps: expected int"),
    (["optim.lr=-1"], "optim.lr: expected a positive number"),
    (["model.n_embd=100", "model.n_head=3"], "model.n_embd=100 must be divisible by model.n_head=3"),
    (["model.n_head=4", "model.n_kv_head=3"], "divisible by model.n_kv_head=3"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.batch_size=10 must be divisible"),
    (["parallel.strategy=dpp"], "did you mean 'ddp'?"),
    (["model.preset=gpt5"], "unknown preset 'gpt5'"),
    (["model=3"], "is a section"),
    (["train.max_steps"], "expected key=value"),
])
def test_errors_are_one_clear_line(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides).validate(1)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_batch_divisibility_depends_on_world_size() -> None:
    cfg = load_config(None, ["train.batch_size=8", "train.micro_batch_size=4"])
    cfg.validate(2)
    with pytest.raises(ConfigError, match="world_size\\*train.micro_batch_size=4\\*4=16"):
        cfg.validate(4)


def test_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  n_layer: [1\n")
    with pytest.raises(ConfigError, match=f"{bad}.*invalid YAML"):
        load_config(str(bad))
    typo = tmp_path / "typo.yaml"
    typo.write_text("train:\n  max_step: 3\n")
    with pytest.raises(ConfigError, match=f"{typo}: unknown config key 'train.max_step'; did you mean train.max_steps"):
        load_config(str(typo))
    with pytest.raises(ConfigError, match="not found"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])


def test_launcher_rejects_bad_config_before_touching_anything(tmp_path: Path) -> None:
    out = tmp_path / "run"
    p = run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={out}", "optim.lr=-0.1"],
                     check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == ["config error: optim.lr: expected a positive number, got -0.1"]
    assert not out.exists()


def test_bad_input_found_after_start_up_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "missing.txt"
    p = run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={tmp_path / 'run'}",
                      f"data.source={missing}", f"data.dir={tmp_path / 'data'}"], check=False)
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [  # both problems: no prepared data, and no source to build it from
        f"error: data.source {missing}: input file not found; data.dir {tmp_path / 'data'} holds no prepared data "
        "(no index.json) to train on instead"]
    p = run_launcher(["launch/pretrain.py", "--config", "configs/debug.yaml", f"out_dir={tmp_path / 'run'}",
                      "tokenizer.name=gtp2"], check=False)
    assert p.returncode == 2 and p.stderr.strip().splitlines()[-1].startswith(
        "error: tokenizer.name: unknown tokenizer 'gtp2'")


def test_resume_model_check_reads_old_configs_onto_defaults() -> None:
    from llm_dist.stages import check_model_matches

    cfg = load_config(None, ["model.vocab_size=257", "model.ops=scratch", "model.dropout=0.1"])
    saved = {"model": {k: v for k, v in cfg.to_dict()["model"].items() if k not in ("moe", "attn", "ops", "dropout")}}
    check_model_matches(cfg, saved, "ck")  # keys the checkpoint predates count as defaults; ops/dropout may change
    cfg.model.n_layer += 1
    with pytest.raises(ConfigError, match=r"checkpoint ck has a different model: n_layer: 4 -> 5"):
        check_model_matches(cfg, saved, "ck")
    cfg.model.n_layer -= 1
    cfg.model.moe.num_experts = 4
    with pytest.raises(ConfigError, match=r"moe: .*'num_experts': 0.* -> .*'num_experts': 4"):
        check_model_matches(cfg, saved, "ck")


def test_every_float_key_refuses_nan_and_inf() -> None:
    """The float coercion refuses non-finite values for every key (loading.NONFINITE_OK lists exceptions)."""
    import dataclasses
    import typing

    from llm_dist.config.loading import NONFINITE_OK

    def floats(cls, prefix=""):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if dataclasses.is_dataclass(hints[f.name]):
                yield from floats(hints[f.name], f"{prefix}{f.name}.")
            elif hints[f.name] is float:
                yield prefix + f.name

    keys = [k for k in floats(Config) if k not in NONFINITE_OK]
    assert len(keys) >= 30
    for key in keys:
        for bad in ("nan", "inf", "-inf", "NaN", "1e999"):
            with pytest.raises(ConfigError, match=f"^{key}: expected a finite number"):
                load_config(None, [f"{key}={bad}"])
        nested: dict = {}
        node = nested
        *sections, leaf = key.split(".")
        for name in sections:
            node = node.setdefault(name, {})
        node[leaf] = float("inf")  # as YAML's .inf arrives
        with pytest.raises(ConfigError, match=f"^{key}: expected a finite number"):
            apply_dict(Config(), nested)


def test_yaml_duplicate_keys_refused_but_merge_keys_still_work(tmp_path: Path) -> None:
    dup = tmp_path / "dup.yaml"
    dup.write_text("optim: {lr: 1.0e-3, lr: 2.0e-3}\n")
    with pytest.raises(ConfigError, match=f"config file {dup} line 1: .*duplicate key 'lr'"):
        load_config(str(dup))
    from llm_dist.config.loading import safe_load_unique

    # `<<: *anchor` merge keys may be overridden by explicit ones: not duplicates
    assert safe_load_unique("a: &x {b: 1, c: 2}\nd:\n  <<: *x\n  b: 3\n") == {"a": {"b": 1, "c": 2}, "d": {"b": 3, "c": 2}}


def test_shakespeare_char_gpu_is_nanogpts_recipe() -> None:
    """configs/shakespeare_char_gpu.yaml parses, validates and is nanoGPT's train_shakespeare_char.py."""
    import torch

    from llm_dist.model.transformer import Transformer
    from llm_dist.train.optim import lr_at

    cfg = load_config(str(REPO / "configs/shakespeare_char_gpu.yaml"))
    cfg.model.vocab_size = 256  # what the byte tokenizer sets at start-up
    cfg.validate(1)
    m, o, t, e = cfg.model, cfg.optim, cfg.train, cfg.eval
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout, m.bias) == (6, 6, 384, 256, 0.2, False)
    assert cfg.tokenizer.name == "byte" and cfg.data.source == "data/tinyshakespeare/input.txt"
    assert (REPO / cfg.data.source).is_file()
    assert (t.batch_size, t.micro_batch_size, t.max_steps, t.grad_clip, t.compile) == (64, 64, 5000, 1.0, True)
    assert (o.beta1, o.beta2, o.weight_decay, o.warmup_steps, o.schedule) == (0.9, 0.99, 0.1, 100, "cosine")
    assert (e.interval, e.steps) == (250, 200)
    # nanoGPT's schedule: linear warm-up to 1e-3 at iteration 100, cosine to min_lr 1e-4 at 5,000.
    assert lr_at(100, o, t.max_steps) == pytest.approx(1e-3)
    assert lr_at(5000, o, t.max_steps) == pytest.approx(1e-4)
    # nanoGPT prints 10.65M (65-character vocabulary, position table excluded); 191 more byte rows x 384.
    with torch.device("meta"):
        model = Transformer(m)
    assert model.num_params() - model.pos_emb.weight.numel() == pytest.approx(10.65e6 + 191 * 384, rel=1e-3)
