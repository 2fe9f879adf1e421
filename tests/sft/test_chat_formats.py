"""Chat formats (llm_dist/sft/chat_format.py): rendered text against the formats' public specifications,
the loss mask, the Jinja chat_template (jinja2 and transformers' apply_chat_template) against the Python
rendering, the project format byte-identical to before, and the format threaded through SFT, reward and RL.

Expected strings are written by hand from the specs: ChatML as in Qwen's docs
(`<|im_start|>{role}\\n{content}<|im_end|>\\n`, generation prompt `<|im_start|>assistant\\n`) and Llama 3 as in
Meta's Llama 3 model card (`<|begin_of_text|>`, then `<|start_header_id|>{role}<|end_header_id|>\\n\\n{content}
<|eot_id|>` per message, generation prompt `<|start_header_id|>assistant<|end_header_id|>\\n\\n`).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

from llm_dist.config import Config, ConfigError
from llm_dist.sft.chat import add_chat_tokens
from llm_dist.sft.chat_format import CHATML, FORMATS, LLAMA3, chat_format
from llm_dist.tokenizer import BPETokenizer, ByteTokenizer
from llm_dist.tokenizer.pretokenize import GPT2_PATTERN
from llm_dist.train.trainer import IGNORE_INDEX
from tests.helpers import run_launcher

SYS = {"role": "system", "content": "You are a helpful assistant."}
U1 = {"role": "user", "content": "Hello"}
A1 = {"role": "assistant", "content": "Hi there"}
U2 = {"role": "user", "content": "What is 2+2?"}
A2 = {"role": "assistant", "content": "4"}

# (messages, add_generation_prompt) -> the reference text of each format
CASES = {
    "single": ([U1, A1], False),
    "multi": ([U1, A1, U2, A2], False),
    "system": ([SYS, U1, A1], False),
    "prompt": ([U1], True),
    "system_prompt": ([SYS, U1, A1, U2], True),
}
EXPECTED = {
    "project": {
        "single": "<|user|>Hello<|end|><|assistant|>Hi there<|end|>",
        "multi": "<|user|>Hello<|end|><|assistant|>Hi there<|end|><|user|>What is 2+2?<|end|><|assistant|>4<|end|>",
        "system": "<|system|>You are a helpful assistant.<|end|><|user|>Hello<|end|><|assistant|>Hi there<|end|>",
        "prompt": "<|user|>Hello<|end|><|assistant|>",
        "system_prompt": "<|system|>You are a helpful assistant.<|end|><|user|>Hello<|end|><|assistant|>Hi there"
                         "<|end|><|user|>What is 2+2?<|end|><|assistant|>",
    },
    "chatml": {
        "single": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n",
        "multi": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n"
                 "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n",
        "system": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                  "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\nHi there<|im_end|>\n",
        "prompt": "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n",
        "system_prompt": "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n"
                         "<|im_start|>assistant\nHi there<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
                         "<|im_start|>assistant\n",
    },
    "llama3": {
        "single": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>",
        "multi": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
                 "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                 "<|start_header_id|>assistant<|end_header_id|>\n\n4<|eot_id|>",
        "system": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant.<|eot_id|>"
                  "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>",
        "prompt": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                  "<|start_header_id|>assistant<|end_header_id|>\n\n",
        "system_prompt": "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful assistant."
                         "<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
                         "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
                         "<|start_header_id|>assistant<|end_header_id|>\n\n",
    },
}
# Content with surrounding whitespace, newlines, quotes, braces, Jinja-looking text and a special-token string.
TRICKY = [{"role": "system", "content": " Be {{ brief }} & 'exact'.\n"},
          {"role": "user", "content": "\n  two\nlines \\n {% raw %} <|im_end|> "},
          {"role": "assistant", "content": "  ok \"x\"\n\n"}]


def _tok(fmt):
    return add_chat_tokens(ByteTokenizer(), fmt)


@pytest.mark.parametrize("name", list(FORMATS))
@pytest.mark.parametrize("case", list(CASES))
def test_rendered_text_and_ids_match_the_spec(name, case):
    fmt, (msgs, gen) = chat_format(name), CASES[case]
    want = EXPECTED[name][case]
    assert fmt.render_text(msgs, add_generation_prompt=gen) == want
    tok = _tok(fmt)
    ids = fmt.prompt_ids(tok, msgs) if gen else fmt.render(tok, msgs)[0]
    assert tok.decode(ids) == want
    # every special-token string of the text is the special id, never its bytes
    assert ids == tok.encode(want, allowed_special=set(fmt.special_tokens))


def test_llama3_strips_content_and_chatml_keeps_it():
    msgs = [{"role": "user", "content": "  hi \n"}, {"role": "assistant", "content": "\n yo  "}]
    assert LLAMA3.render_text(msgs) == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nhi<|eot_id|>"
                                        "<|start_header_id|>assistant<|end_header_id|>\n\nyo<|eot_id|>")
    assert CHATML.render_text(msgs) == "<|im_start|>user\n  hi \n<|im_end|>\n<|im_start|>assistant\n\n yo  <|im_end|>\n"


@pytest.mark.parametrize("name", list(FORMATS))
def test_mask_is_assistant_content_and_end_of_turn(name):
    fmt = chat_format(name)
    tok = _tok(fmt)
    for msgs in ([U1, A1], [SYS, U1, A1, U2, A2], TRICKY):
        ids, mask = fmt.render(tok, msgs)
        assert len(ids) == len(mask)
        trained = tok.decode([i for i, m in zip(ids, mask) if m])
        want = "".join(fmt.content(m["content"]) + fmt.end_token for m in msgs if m["role"] == "assistant")
        assert trained == want
        # the split the reward / RL code uses: prompt ids + response ids (+ the footer) == the whole render
        prompt, reply = fmt.prompt_ids(tok, msgs[:-1]), fmt.response_ids(tok, msgs[-1]["content"])
        assert ids == prompt + reply + [i for p in fmt.footer for i in tok.encode_ordinary(p)]
        assert reply[-1] == fmt.end_id(tok) == tok.special_tokens[fmt.stop_tokens[0]]
    # a special-token string typed in content stays plain text
    ids, _ = fmt.render(tok, TRICKY)
    assert ids.count(fmt.end_id(tok)) == 3 and fmt.render_text(TRICKY) == tok.decode(ids)


def _old_project_render(tok, messages):
    """The project format's rendering before chat formats existed (copied from the previous chat.render)."""
    sp = tok.special_tokens
    ids, mask = [], []
    for m in messages:
        body = tok.encode_ordinary(m["content"]) + [sp["<|end|>"]]
        ids.append(sp["<|" + m["role"] + "|>"])
        mask.append(False)
        ids += body
        mask += [m["role"] == "assistant"] * len(body)
    return ids, mask


def test_project_format_is_unchanged():
    from llm_dist.sft.chat import prompt_ids, render

    tok = add_chat_tokens(ByteTokenizer())
    assert tok.name == "byte+chat" and tok.vocab_size == 261
    assert [tok.special_tokens[t] for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")] == [257, 258, 259, 260]
    for msgs in ([U1, A1], [SYS, U1, A1, U2, A2], TRICKY):
        assert render(tok, msgs) == _old_project_render(tok, msgs)
        assert prompt_ids(tok, msgs[:-1]) == _old_project_render(tok, msgs[:-1])[0] + [259]


def test_imported_tokenizer_keeps_its_own_special_ids():
    ranks = {bytes([b]): b for b in range(256)}
    qwen_like = BPETokenizer("q", GPT2_PATTERN, ranks, {"<|endoftext|>": 256, "<|im_start|>": 300, "<|im_end|>": 301})
    assert add_chat_tokens(qwen_like, CHATML) is qwen_like
    ids, _ = CHATML.render(qwen_like, [U1, A1])
    assert ids[0] == 300 and CHATML.end_id(qwen_like) == 301
    grown = add_chat_tokens(qwen_like, LLAMA3)  # missing ones follow the highest id
    assert [grown.special_tokens[t] for t in LLAMA3.special_tokens] == [302, 303, 304, 305]
    assert grown.name == "q+llama3"
    with pytest.raises(ValueError, match="has no <|begin_of_text|>"):
        LLAMA3.render(qwen_like, [U1])


def _jinja_render(template, msgs, gen):
    pytest.importorskip("jinja2")
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise ValueError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    return env.from_string(template).render(messages=msgs, add_generation_prompt=gen, bos_token="<s>",
                                            raise_exception=raise_exception)


@pytest.mark.parametrize("name", list(FORMATS))
def test_jinja_template_renders_the_same_text(name):
    fmt = chat_format(name)
    for case, (msgs, gen) in CASES.items():
        assert _jinja_render(fmt.jinja, msgs, gen) == EXPECTED[name][case]
    for gen in (False, True):
        assert _jinja_render(fmt.jinja, TRICKY, gen) == fmt.render_text(TRICKY, gen)
    with pytest.raises(ValueError, match="unknown role tool"):
        _jinja_render(fmt.jinja, [{"role": "tool", "content": "x"}], False)


@pytest.mark.parametrize("name", list(FORMATS))
def test_transformers_apply_chat_template_matches(name):
    """A byte-level HF tokenizer with the same ids as add_chat_tokens(ByteTokenizer()) (bytes 0-255 in order,
    <|endoftext|> 256, then the format's specials): apply_chat_template gives our text and our ids."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    fmt = chat_format(name)
    ours = _tok(fmt)
    b2u = bytes_to_unicode()
    hf = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(["<|endoftext|>", *fmt.special_tokens])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=hf, chat_template=fmt.jinja,
                                                eos_token=fmt.stop_tokens[0])
    for msgs, gen in [*CASES.values(), (TRICKY[:2], True)]:
        text = fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert text == fmt.render_text(msgs, gen)
        if "<|im_end|>" in "".join(m["content"] for m in msgs):
            continue  # HF tokenizes a special-token string typed in content as the special; we do not
        got = fast.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen)
        got = got["input_ids"] if not isinstance(got, list) else got
        want = fmt.prompt_ids(ours, msgs) if gen else fmt.render(ours, msgs)[0]
        assert list(got) == want


def test_config_key_is_validated_and_listed():
    from llm_dist.config import help_text, parse_args
    from llm_dist.config.validation import CHAT_TEMPLATES

    assert CHAT_TEMPLATES == tuple(FORMATS)
    assert Config().chat.template == "project"
    assert parse_args(["chat.template=llama3"]).chat.template == "llama3"
    with pytest.raises(ConfigError, match=r"chat.template: 'chatm' is not one of .*did you mean 'chatml'"):
        parse_args(["chat.template=chatm"]).validate()
    assert "chat.template" in help_text()
    with pytest.raises(ValueError, match="unknown chat template 'x'"):
        chat_format("x")


def test_reward_and_rl_prompts_follow_the_format():
    from llm_dist.reward.data import Pair, prompt_response, sequence, tokenize_pairs
    from llm_dist.rl.source import chat_prompt
    from llm_dist.rl.tasks.base import TaskItem

    tok = _tok(LLAMA3)
    pair = Pair([U1], "Hi there", "Go away")
    p, r = prompt_response(tok, pair.prompt, pair.chosen, LLAMA3)
    assert tok.decode(p) == EXPECTED["llama3"]["prompt"] and tok.decode(r) == "Hi there<|eot_id|>"
    (tp,), _ = tokenize_pairs(tok, [pair], 256, 0.0, LLAMA3)
    assert tp.chosen == sequence(tok, pair.prompt, "Hi there", LLAMA3) == p + r
    assert tok.decode(tp.rejected) == EXPECTED["llama3"]["prompt"] + "Go away<|eot_id|>"
    item = TaskItem(prompt="Hello", answer="x")
    assert tok.decode(chat_prompt(tok, item, LLAMA3)) == EXPECTED["llama3"]["prompt"]
    ctok = _tok(CHATML)
    assert ctok.decode(chat_prompt(ctok, item, CHATML)) == EXPECTED["chatml"]["prompt"]


def test_rollout_source_prompts_in_the_run_format():
    """GRPO's rollouts prompt in cfg.chat.template and stop at its end-of-turn token."""
    from llm_dist.model.transformer import build_model
    from llm_dist.rl.source import RolloutSource
    from llm_dist.rl.tasks import get_task

    cfg = Config()
    cfg.chat.template = "chatml"
    cfg.train.batch_size, cfg.rl.group_size, cfg.rl.max_new_tokens = 2, 2, 3
    cfg.model.n_layer, cfg.model.n_embd, cfg.model.n_head, cfg.model.block_size = 1, 32, 2, 64
    tok = _tok(CHATML)
    cfg.model.vocab_size = tok.vocab_size
    task = get_task("addition", 1, 0, "")
    model = build_model(cfg.model, "cpu", seed=0)
    src = RolloutSource(cfg, task, tok, model, None, CHATML.end_id(tok), 0, 1, torch.device("cpu"))
    prompts, comps, _, _ = src.sample(0, 0)
    item = task.item(0, "train")
    assert tok.decode(prompts[0]) == f"<|im_start|>user\n{item.prompt}<|im_end|>\n<|im_start|>assistant\n"
    assert all(len(c) <= 3 for c in comps)


def test_sft_runs_in_chatml_and_llama3(tmp_path, monkeypatch):
    """Two steps of the SFT launcher per format: the run records chat.template, its checkpoint's tokenizer has
    the format's tokens, the training targets are exactly the replies + end-of-turn; reward/RL refuse to read
    the checkpoint in another format; chat generation from it uses the recorded format."""
    import llm_dist.sample
    from llm_dist.sample import load_model, main as sample_main
    from llm_dist.model.generate import generate as real_generate
    from llm_dist.sft.chat import read_jsonl
    from llm_dist.sft.data import SFTLoader, tokenize
    from llm_dist.stages import setup_chat_model

    data = tmp_path / "train.jsonl"
    rows = [{"messages": [{"role": "system", "content": "Add."}, {"role": "user", "content": f"{a}+{a}="},
                          {"role": "assistant", "content": str(2 * a)}]} for a in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name in ("chatml", "llama3"):
        fmt, out = chat_format(name), tmp_path / name
        run_launcher(["launch/sft.py", "model.preset=debug", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                      "model.block_size=64", "tokenizer.name=byte", f"sft.data={data}", "sft.eval_fraction=0.25",
                      "sft.eval_examples=2", "sft.max_new_tokens=2", "train.batch_size=2", "train.micro_batch_size=2",
                      "train.max_steps=2", "train.dtype=fp32", "parallel.device=cpu", "eval.interval=0",
                      "eval.steps=1", f"chat.template={name}", f"out_dir={out}"])
        _, tok, cfg = load_model(str(out))
        assert cfg.chat.template == name and not fmt.missing_tokens(tok) and tok.name == f"byte+{name}"
        # the targets of a training row: every non-ignored target is a reply token or its end-of-turn
        ex, _, _ = tokenize(tok, read_jsonl(str(data)), 64, fmt)
        x, y, seg = SFTLoader(ex, 64, 2, 2, 0, 1, pack=True).next_batch()[0]  # (2, 64) each
        for row_y, row_seg, row_x in zip(y, seg, x):
            for k in range(int(row_seg.max()) + 1):
                kept = row_y[(row_seg == k) & (row_y != IGNORE_INDEX)].tolist()
                a = int(re.search(r"(\d+)\+\1=", tok.decode(row_x[row_seg == k].tolist())).group(1))
                assert tok.decode(kept) == f"{2 * a}{fmt.end_token}"
        # a reward model (or RL policy) started from it must use its format
        other = Config()
        other.tokenizer.name = "byte"
        other.chat.template = "project"
        with pytest.raises(ConfigError, match=f"trained with chat.template={name}; set chat.template={name}"):
            setup_chat_model(other, str(out))
        other.chat.template = name
        tok2, _ = setup_chat_model(other, str(out))
        assert tok2.special_tokens == tok.special_tokens
        # chat generation: the prompt in the run's format, stopping at its end-of-turn token
        seen = {}

        def spy(model, idx, max_new_tokens, **kw):
            seen.update(prompt=idx[0].tolist(), eos_id=kw["eos_id"])
            return real_generate(model, idx, max_new_tokens, **kw)

        monkeypatch.setattr(llm_dist.sample, "generate", spy)
        assert sample_main(["--checkpoint", str(out), "--chat", "--system", "Add.", "--prompt", "1+1=",
                            "--max-new-tokens", "3", "--device", "cpu", "--temperature", "0"]) == 0
        assert seen == {"prompt": fmt.prompt_ids(tok, rows[1]["messages"][:1] + [
            {"role": "user", "content": "1+1="}]), "eos_id": fmt.end_id(tok)}
    assert sample_main(["--checkpoint", str(out), "--system", "Add."]) == 2  # --system needs --chat
