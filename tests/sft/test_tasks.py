"""Tasks: deterministic, disjoint train/eval splits; rewards; GSM8K answer extraction; SFT warm-up rows."""

from __future__ import annotations

from llm_dist.rl.tasks import get_task
from llm_dist.rl.tasks.gsm8k import gsm8k_reward


def test_synthetic_items_are_deterministic_and_splits_disjoint():
    for name in ("addition", "reverse"):
        t = get_task(name, level=2)
        assert t.items("train", 5) == get_task(name, level=2).items("train", 5)
        train = {it.prompt for it in t.items("train", 400)}
        held = {it.prompt for it in t.items("eval", 100)}
        assert not train & held
    a = get_task("addition", level=3).item(0, "train")
    x, y = a.prompt[:-1].split("+")
    assert a.answer == str(int(x) + int(y))
    r = get_task("reverse", level=4).item(3, "eval")
    assert r.answer == r.prompt.split(": ")[1][::-1]


def test_rewards_and_warmup_rows():
    t = get_task("addition", level=3)
    it = t.item(1, "train")
    assert t.reward(f" {it.answer} ", it) == 1.0 and t.reward(it.answer + "0", it) == 0.0
    assert t.sft_rows(2) == [{"prompt": i.prompt, "response": i.answer} for i in t.items("train", 2)]


def test_gsm8k_reward_extracts_hash_answer_with_commas():
    ref = "She makes 9 * 2 = $18 every day.\n#### 1,018"
    assert gsm8k_reward("... so the answer is\n#### 1018", ref) == 1.0
    assert gsm8k_reward("#### 1,018.00", ref) == 1.0
    assert gsm8k_reward("1018", ref) == 0.0  # no '####': no answer stated
    g = get_task("gsm8k")
    assert g.num_items("train") == 7473 and g.num_items("eval") == 1319
    first = g.item(0, "eval")
    assert first.prompt.startswith("Janet") and g.reward("#### 18", first) == 1.0
