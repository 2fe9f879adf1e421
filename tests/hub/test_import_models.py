"""HF import in one process: tiny random GPT-2 / Llama 3 (rope_type llama3) / Mistral / Qwen2 (tied and untied)
folders load with logits equal to transformers' (and export back), llama3 RoPE frequencies equal transformers'
own, hub cache snapshots resolve, the tokenizer equals transformers' and survives a checkpoint, and
unsupported folders are refused in one line."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from llm_dist.config import AttnConfig, ConfigError, ModelConfig, RopeScalingConfig
from llm_dist.hub.imports import check_model_conflicts, hf_state_dict, import_hf, open_hf, resolve_hf_dir
from llm_dist.model.hf_interop import HFFormatError, save_hf
from llm_dist.model.layers import rope_inv_freq
from llm_dist.model.transformer import build_model
from tests.hub.hf_models import EOS, LLAMA3, TEXT, V, save_hf_folder, save_tokenizer

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

KINDS = ["gpt2", "llama3", "mistral", "qwen2_tied", "qwen2_untied"]


def _load(folder: Path) -> torch.nn.Module:
    src = open_hf(folder)
    model = build_model(src.model, "cpu")
    model.load_state_dict(hf_state_dict(src))
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_import_then_export_logits_match_transformers(tmp_path: Path, kind: str):
    hf = save_hf_folder(kind, tmp_path / "hf")
    model = _load(tmp_path / "hf")
    idx = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))  # 40 > the llama3 original context 16
    with torch.no_grad():
        want = hf(idx).logits
        torch.testing.assert_close(model(idx)[:, :, :V], want, atol=1e-5, rtol=1e-5)
    # export direction: save_hf -> transformers, the same architecture class and the same logits
    save_hf(model, tmp_path / "out")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(again).__name__ == type(hf).__name__
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, want, atol=1e-5, rtol=1e-5)
    cfg = model.cfg
    if kind.startswith("qwen2"):
        assert cfg.qkv_bias and not cfg.bias and cfg.tie_embeddings == (kind == "qwen2_tied")
        assert model.blocks[0].attn.wo.bias is None and model.blocks[0].attn.wq.bias is not None
    if kind == "llama3":
        assert cfg.rope_scaling == RopeScalingConfig("llama3", 8.0, 1.0, 4.0, 16)
        # the scaling matters at these positions: without it the logits differ
        plain = build_model(dataclasses.replace(cfg, rope_scaling=RopeScalingConfig()), "cpu").eval()
        plain.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (plain(idx)[:, :, :V] - want).abs().max() > 1e-3
    if kind == "mistral":
        assert cfg.attn.window == 5


@pytest.mark.parametrize("params", [LLAMA3, {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                                    {"rope_type": "linear", "factor": 4.0}])
def test_rope_frequencies_equal_transformers(params):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf_cfg = LlamaConfig(hidden_size=128, num_attention_heads=1, rope_theta=500000.0, rope_scaling=dict(params),
                         max_position_embeddings=131072)
    want, scale = ROPE_INIT_FUNCTIONS[params["rope_type"]](hf_cfg, "cpu")
    kw = {k: v for k, v in params.items() if k not in ("rope_type", "rope_theta")}
    got = rope_inv_freq(128, 500000.0, RopeScalingConfig(type=params["rope_type"], **kw))
    assert scale == 1.0
    torch.testing.assert_close(got.float(), want.float(), atol=0, rtol=2e-6)  # HF: float32, here float64


def test_qwen2_style_project_model_exports_as_qwen2(tmp_path: Path):
    cfg = ModelConfig(vocab_size=61, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp="swiglu",
                      mlp_hidden=40, norm="rmsnorm", pos_emb="rope", bias=False, qkv_bias=True, tie_embeddings=False,
                      init_std=0.2, rope_scaling=RopeScalingConfig("linear", 2.0))
    model = build_model(cfg, "cpu", seed=0).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.dim() == 1:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "norm" in n else 0.0))
    save_hf(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    idx = torch.randint(0, 61, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[:, :, :61], atol=1e-5, rtol=1e-5)


def test_hub_cache_snapshot_layout_resolves(tmp_path: Path):
    repo = tmp_path / "models--org--tiny"
    snap = repo / "snapshots" / "abc123"
    save_hf_folder("qwen2_tied", snap)
    shutil.copytree(snap, repo / "snapshots" / "old000")  # a stale snapshot: refs/main decides
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123\n")
    assert resolve_hf_dir(repo) == snap and resolve_hf_dir(snap) == snap
    assert resolve_hf_dir(tmp_path) is None
    shutil.rmtree(repo / "snapshots" / "old000")
    (repo / "refs" / "main").unlink()  # no ref: the only snapshot
    assert resolve_hf_dir(repo) == snap
    src = open_hf(repo)
    assert src.model.qkv_bias and src.tokenizer.name == "hf:org/tiny"


def test_tokenizer_equals_transformers_and_survives_a_checkpoint(tmp_path: Path):
    from llm_dist.checkpoint import load_checkpoint_tokenizer
    from llm_dist.sft.chat import CHAT_TOKENS, add_chat_tokens
    from llm_dist.tokenizer import HFTokenizer, load_tokenizer

    fast = save_tokenizer(tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")  # a folder with tokenizer.json
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 300 and tok.eot_id == 0 == fast.eos_token_id
    for text in [*TEXT, "unseen wørds ✓✓ and 123"]:
        ids = tok.encode_ordinary(text)
        assert ids == fast(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text == fast.decode(ids)
    assert tok.encode_ordinary(EOS) != [0] and tok.encode(EOS, allowed_special="all") == [0]
    assert b"".join(tok.decode_bytes([i]) for i in tok.encode_ordinary("é✓")) == "é✓".encode()  # split characters
    assert tok.decode_bytes([310, *tok.encode_ordinary("hi")]) == b"hi"  # a model row past the tokenizer: nothing
    chat = add_chat_tokens(tok)
    assert [chat.special_tokens[t] for t in CHAT_TOKENS] == [300, 301, 302, 303] and chat.vocab_size == 304
    assert chat.encode_ordinary(TEXT[0]) == tok.encode_ordinary(TEXT[0])
    assert chat.encode("<|user|>hi", allowed_special="all")[0] == 301
    chat.save(tmp_path / "saved.json")
    assert load_tokenizer(tmp_path / "saved.json").fingerprint() == chat.fingerprint() != tok.fingerprint()
    # import-hf stores it in the checkpoint (hf_tokenizer.json) and it reloads with no source folder
    hf = save_hf_folder("llama3", tmp_path / "hf")
    url = import_hf(tmp_path / "hf", tmp_path / "run")
    shutil.rmtree(tmp_path / "hf")
    assert (Path(url) / "hf_tokenizer.json").is_file()
    # ... and the weights, as a stage's init_from reads them (chat tokens: 304 ids fit the 317 rows)
    from llm_dist.stages import checkpoint_model_config, init_from_checkpoint

    model = build_model(checkpoint_model_config(url), "cpu").eval()
    init_from_checkpoint(model, url, V)
    idx = torch.randint(0, V, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[:, :, :V], hf(idx).logits, atol=1e-5, rtol=1e-5)
    back = load_checkpoint_tokenizer(url)
    assert isinstance(back, HFTokenizer) and back.fingerprint() == tok.fingerprint() and back.eot_id == 0
    # no tokenizer_config.json: bos/eos from config.json's ids
    (tmp_path / "tok" / "tokenizer_config.json").unlink()
    (tmp_path / "tok" / "config.json").write_text(json.dumps({"eos_token_id": [5, 0], "bos_token_id": 7}))
    old = load_tokenizer(tmp_path / "tok")
    assert old.eot_id == 5 and old.bos_id == 7


def test_model_keys_that_conflict_with_the_hf_config_are_named():
    hf = ModelConfig(n_layer=2, n_embd=32, block_size=64, pos_emb="rope")
    check_model_conflicts(ModelConfig(dropout=0.1, block_size=32, attn_impl="manual"), hf, "init_from x")
    with pytest.raises(ConfigError, match=r"drop model.n_layer=6 \(the model has 2\); model.attn.window=4"):
        check_model_conflicts(ModelConfig(n_layer=6, attn=AttnConfig(window=4)), hf, "init_from x")
    with pytest.raises(ConfigError, match="block_size=100 exceeds the model.s context"):
        check_model_conflicts(ModelConfig(block_size=100), dataclasses.replace(hf, block_size=32), "init_from x")


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("change, message", [
    (dict(model_type="bert"), "model_type='bert' is not supported; expected one of gpt2, llama, mistral, qwen2"),
    (dict(model_type="mixtral"), "model_type='mixtral' is not supported"),
    (dict(num_local_experts=8), "num_local_experts=8: Mixture-of-Experts checkpoints are not supported"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
     "rope_type='yarn' is not supported (supported: default, linear, llama3)"),
    (dict(head_dim=16), "head_dim=16 != hidden_size/num_attention_heads=8"),
    (dict(use_sliding_window=True), "use_sliding_window=true is not supported for qwen2"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'; only silu"),
])
def test_unsupported_configs_are_refused_in_one_line(tmp_path: Path, change, message):
    save_hf_folder("qwen2_tied", tmp_path)
    _edit_config(tmp_path, **change)
    with pytest.raises(HFFormatError) as e:
        open_hf(tmp_path)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_import_hf_tool_exits_2_with_one_line(tmp_path: Path, capsys):
    from safetensors.torch import load_file, save_file

    from tests.helpers import load_tool

    tool = load_tool("checkpoint")
    assert tool.main(["import-hf", str(tmp_path / "nowhere"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere: no such directory" in err[0]
    save_hf_folder("llama3", tmp_path / "hf")
    weights = load_file(tmp_path / "hf" / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, tmp_path / "hf" / "model.safetensors")
    capsys.readouterr()  # transformers' save progress bar
    assert tool.main(["import-hf", str(tmp_path / "hf"), str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'hf'}: weights: missing tensor 'model.layers.1.mlp.up_proj.weight'"]
    assert not (tmp_path / "o" / "checkpoints").exists()  # nothing half-written


def test_chat_formats_reuse_or_add_tokens_of_an_hf_tokenizer(tmp_path: Path):
    from llm_dist.config import Config
    from llm_dist.stages import setup_chat_model

    save_hf_folder("qwen2_tied", tmp_path / "hf", extra_specials=("<|im_start|>", "<|im_end|>"))  # ids 300, 301
    for template, vocab, ids in (("chatml", V, {"<|im_start|>": 300, "<|im_end|>": 301}),  # the model's own
                                 ("project", V, {"<|system|>": 302, "<|end|>": 305})):  # appended, within 317 rows
        cfg = Config()
        cfg.chat.template = template
        tok, url = setup_chat_model(cfg, str(tmp_path / "hf"))
        assert url == str(tmp_path / "hf") and cfg.model.vocab_size == vocab and cfg.model.qkv_bias
        assert {t: tok.special_tokens[t] for t in ids} == ids
