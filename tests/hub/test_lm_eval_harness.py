"""lm-evaluation-harness runs a local multiple-choice task on an exported folder (`model="hf"`, no network) and
agrees with the project's evaluator item by item: the same log-likelihoods, `acc` = `mc/acc` and lm-eval's
`acc_norm` = `mc/acc_norm_chars` (per character, not per token)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from llm_dist.eval.multiple_choice import encode_rows, evaluate_mc, load_mc, score_rows
from llm_dist.sample import load_model
from tests.helpers import REPO

from .conftest import export

MC = REPO / "data" / "tinyshakespeare" / "mc_val.jsonl"
N = 20

# The file's endings carry their leading space, so the target delimiter is empty: lm-eval's continuation
# is then exactly the ending, as in the project's evaluator (join_parts adds no space).
TASK = """task: llm_dist_shakespeare_mc
dataset_path: json
dataset_kwargs:
  data_files:
    validation: {data}
validation_split: validation
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{endings}}}}"
doc_to_target: "{{{{label}}}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def test_lm_eval_on_an_exported_model_equals_the_project_evaluator(llama_run, tmp_path, monkeypatch):
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(var, "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder = export(llama_run, tmp_path / "hf")
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "llm_dist_shakespeare_mc.yaml").write_text(TASK.format(data=MC))
    res = lm_eval.simple_evaluate(model="hf", model_args=f"pretrained={folder},dtype=float32", device="cpu",
                                  tasks=["llm_dist_shakespeare_mc"], task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  limit=N, batch_size=16, log_samples=True)
    got = res["results"]["llm_dist_shakespeare_mc"]
    samples = sorted(res["samples"]["llm_dist_shakespeare_mc"], key=lambda s: s["doc_id"])
    assert len(samples) == N

    model, tok, cfg = load_model(str(llama_run))
    examples = load_mc(MC, N)
    ours = evaluate_mc(model, tok, examples, cfg.model.block_size, batch_size=16)
    for ex, s in zip(examples, samples):
        rows = encode_rows(tok, ex, cfg.model.block_size)
        with torch.no_grad():
            ll = score_rows(model, rows, torch.device("cpu"))[:, 0]
        theirs = torch.tensor([float(r[0]) for r in s["filtered_resps"]], dtype=torch.float64)
        torch.testing.assert_close(theirs, ll, atol=2e-4, rtol=1e-5)  # fp32 logits, summed over <= 40 tokens
    assert got["acc,none"] == pytest.approx(ours["mc/acc"])
    assert got["acc_norm,none"] == pytest.approx(ours["mc/acc_norm_chars"])
    assert ours["mc/n"] == N
