"""`tools/checkpoint.py export-hf`: folders that `AutoModelForCausalLM` and `AutoTokenizer` load with nothing
added, with the project's logits, ids, special ids, chat format and stopping behaviour."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_dist.sample import load_model
from llm_dist.sft.chat import END, prompt_ids, render
from tests.helpers import load_tool

from .conftest import export

transformers = pytest.importorskip("transformers")

TEXTS = ["hello world", "ROMEO:\nBut soft! what light through yonder window breaks?  \n\n", "Café 日本語 👍🏽 x=1;",
         "\x00\t  'll 123456 " + bytes(range(128, 200)).decode("utf-8", errors="replace")]


def _load(folder: Path):  # noqa: ANN202
    model = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, transformers.AutoTokenizer.from_pretrained(folder)


def _check_logits_and_ids(run: Path, folder: Path) -> tuple:
    ours, tok, cfg = load_model(str(run))
    model, hf_tok = _load(folder)
    x = torch.randint(0, cfg.model.vocab_size, (2, cfg.model.block_size), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = ours(x)[..., :cfg.model.vocab_size]
        got = model(x).logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for t in TEXTS:
        assert hf_tok(t)["input_ids"] == tok.encode_ordinary(t), t
        assert hf_tok.decode(tok.encode_ordinary(t)) == t
    return tok, model, hf_tok


def test_gpt2_layout_with_gpt2_tokenizer(gpt2_run, tmp_path):
    out = export(gpt2_run, tmp_path / "hf")
    tok, model, hf_tok = _check_logits_and_ids(gpt2_run, out)
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "gpt2"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (50256,) * 3
    assert hf_tok("hello world")["input_ids"] == [31373, 995]  # GPT-2's own ids
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.chat_template is None
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 50256


def test_llama_layout_with_byte_tokenizer(llama_run, tmp_path):
    out = export(llama_run, tmp_path / "hf")
    tok, model, hf_tok = _check_logits_and_ids(llama_run, out)
    assert model.config.model_type == "llama" and model.config.num_key_value_heads == 2
    # not Llama's defaults (1 and 2 are '\x01' and '\x02' here): the byte tokenizer's <|endoftext|>
    assert (model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id) == (256, 256, 256)
    assert (model.generation_config.bos_token_id, model.generation_config.eos_token_id) == (256, 256)
    assert hf_tok("hé")["input_ids"] == [104, 195, 169] and hf_tok.model_max_length == 512


CONVERSATIONS = [
    [{"role": "user", "content": "3+4?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 12 + 30?"}],
    [{"role": "system", "content": "You are terse.\n"}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4"}, {"role": "user", "content": " and  5+5? 👍 "}],
    [{"role": "user", "content": ""}, {"role": "assistant", "content": "Café"}, {"role": "user", "content": "日本"}],
]


def test_chat_model_template_special_ids_and_generation_stop(chat_run, tmp_path):
    out = export(chat_run, tmp_path / "hf")
    tok, model, hf_tok = _check_logits_and_ids(chat_run, out)
    end, eot = tok.special_tokens[END], tok.eot_id
    assert hf_tok.eos_token == END and hf_tok.eos_token_id == end
    assert model.config.eos_token_id == [end, eot] and model.generation_config.eos_token_id == [end, eot]
    for msgs in CONVERSATIONS:
        want = prompt_ids(tok, msgs)
        assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == tok.decode(want)
        got = hf_tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
        assert (got["input_ids"] if isinstance(got, dict) or hasattr(got, "keys") else got) == want
        full = msgs + [{"role": "assistant", "content": "Yes."}]
        assert hf_tok.apply_chat_template(full, tokenize=False) == tok.decode(render(tok, full)[0])
    # Greedy HF generation stops at <|end|> (the model was trained to answer "Yes." then end its turn), and
    # equals the project's own greedy decoding up to that token.
    from llm_dist.model.generate import generate

    ours, _, _ = load_model(str(chat_run))
    for msgs in CONVERSATIONS[:2]:
        x = torch.tensor([prompt_ids(tok, msgs)])
        hf_out = model.generate(x, max_new_tokens=12, do_sample=False)[0, x.shape[1]:].tolist()
        assert hf_out[-1] == end and end not in hf_out[:-1] and len(hf_out) < 12
        assert hf_tok.decode(hf_out, skip_special_tokens=True) == "Yes."
        mine = generate(ours, x, len(hf_out), temperature=0.0)[0, x.shape[1]:].tolist()
        assert mine == hf_out


def test_cli_refuses_bad_input_with_one_line(gpt2_run, tmp_path, capsys):
    main = load_tool("checkpoint").main
    assert main(["export-hf", str(tmp_path / "nope"), str(tmp_path / "o")]) == 2
    assert "nope: no such file or directory" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    assert main(["export-hf", str(gpt2_run), str(busy)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not empty" in err and "--force" in err
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]  # nothing written
    (busy / "model-00001-of-00002.safetensors").write_text("stale shard of an earlier export")
    assert main(["export-hf", str(gpt2_run), str(busy), "--force", "--dtype", "bf16"]) == 0
    names = sorted(p.name for p in busy.iterdir())
    assert names == sorted(["keep.txt", "config.json", "generation_config.json", "model.safetensors",
                            "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"])
    model = transformers.AutoModelForCausalLM.from_pretrained(busy)
    assert model.dtype == torch.bfloat16
    assert not list(tmp_path.glob(".*export-tmp"))  # the staging folder is gone


def test_export_uses_the_runs_chat_format():
    from llm_dist.hub.export import chat_of, special_ids
    from llm_dist.sft.chat import add_chat_tokens
    from llm_dist.sft.chat_format import chat_format
    from llm_dist.tokenizer import ByteTokenizer

    plain = ByteTokenizer()
    assert chat_of(plain, chat_format("project")) is None  # a pretraining tokenizer is no chat model
    tok = add_chat_tokens(ByteTokenizer(), chat_format("chatml"))
    assert chat_of(tok, chat_format("project")) is None  # chatml tokens are not the project's format
    fmt = chat_of(tok, chat_format("chatml"))
    assert fmt is not None and "<|im_start|>" in fmt.jinja
    assert special_ids(tok, fmt)["eos_token_id"] == [tok.special_tokens["<|im_end|>"], tok.special_tokens["<|endoftext|>"]]
