"""Weighted mixtures: draw proportions, each source's epoch coverage, determinism, order independent of world
size, exact resume across world sizes, and one-line errors for bad mixture files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.data import DataPrepError, ShardedLoader
from llm_dist.data.mixture import BLOCK, MixtureOrder, quotas, read_mixture_file
from llm_dist.data.prepare import prepare_mixture
from llm_dist.tokenizer import ByteTokenizer

BYTE = ByteTokenizer()


def test_quotas_follow_weights_exactly_per_block() -> None:
    q = quotas(np.array([5.0, 3.0, 2.0]))
    assert q.sum() == BLOCK and abs(q[0] / BLOCK - 0.5) <= 1 / BLOCK and abs(q[2] / BLOCK - 0.2) <= 1 / BLOCK
    order = MixtureOrder([1000, 300, 50], [5, 3, 2], seed=7, shuffle=True)
    ids = order.sample_ids(np.arange(3 * BLOCK))
    src = np.searchsorted(order.offsets, ids, side="right") - 1
    for b in range(3):  # every block draws exactly its quotas
        np.testing.assert_array_equal(np.bincount(src[b * BLOCK:(b + 1) * BLOCK], minlength=3), q)
    # Any window, not only whole blocks, is close to the weights.
    win = src[1234:1234 + 2000]
    np.testing.assert_allclose(np.bincount(win, minlength=3) / win.size, [0.5, 0.3, 0.2], atol=0.04)
    # Shuffled inside a block: sources interleave rather than come in runs of thousands.
    assert np.count_nonzero(np.diff(src[:BLOCK])) > BLOCK // 4


def test_each_source_covers_its_samples_before_repeating() -> None:
    n = [1000, 300, 50]
    order = MixtureOrder(n, [5, 3, 2], seed=1, shuffle=True)
    ids = order.sample_ids(np.arange(4 * BLOCK))
    for s, (lo, count) in enumerate(zip(order.offsets.tolist(), n)):
        mine = ids[(ids >= lo) & (ids < lo + count)] - lo  # in draw order
        for e in range(len(mine) // count):
            assert sorted(mine[e * count:(e + 1) * count].tolist()) == list(range(count)), (s, e)
    plain = MixtureOrder(n, [5, 3, 2], seed=1, shuffle=False).sample_ids(np.arange(BLOCK))
    first = plain[plain >= 1300] - 1300  # the small source, unshuffled: 0, 1, 2, ... wrapping at 50
    np.testing.assert_array_equal(first, np.arange(first.size) % 50)


def test_order_is_a_function_of_seed_and_position() -> None:
    a = MixtureOrder([500, 200], [1, 1], seed=3, shuffle=True)
    b = MixtureOrder([500, 200], [1, 1], seed=3, shuffle=True)
    pos = np.arange(10_000)
    np.testing.assert_array_equal(a.sample_ids(pos), b.sample_ids(pos))
    # Asking in pieces, backwards and out of order gives the same answer (no hidden state).
    np.testing.assert_array_equal(np.concatenate([b.sample_ids(pos[5000:][::-1])[::-1], b.sample_ids(pos[:5000])]),
                                  np.concatenate([a.sample_ids(pos[5000:]), a.sample_ids(pos[:5000])]))
    c = MixtureOrder([500, 200], [1, 1], seed=4, shuffle=True)
    assert (c.sample_ids(pos) != a.sample_ids(pos)).mean() > 0.5


def corpus(path: Path, tag: str, n_docs: int) -> str:
    rng = np.random.default_rng(len(tag))
    path.write_text("".join(json.dumps({"text": f"{tag} {i} " + "ab" * int(rng.integers(5, 60))}) + "\n"
                            for i in range(n_docs)))
    return str(path)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("mix")
    corpus(d / "big.jsonl", "BIG", 400)
    corpus(d / "small.jsonl", "small", 60)
    (d / "mix.yaml").write_text("sources:\n  - {path: big.jsonl, weight: 1}\n  - {path: small.jsonl, weight: 3}\n")
    prepare_mixture(d / "out", read_mixture_file(d / "mix.yaml"), BYTE, 0.1, log=None)
    return d / "out"


def steps(data: Path, W: int, mb: int, n: int, B: int = 16, T: int = 32, state: dict | None = None,
          seed: int = 5) -> tuple[list[torch.Tensor], dict]:
    """n global batches (every rank's x concatenated in rank order) and the state after them."""
    loaders = [ShardedLoader(data, "train", T, B, mb, r, W, seed=seed) for r in range(W)]
    if state is not None:
        for ld in loaders:
            ld.load_state_dict(state)
    out = [torch.cat([x for ld in loaders for x, _ in ld.next_batch()]) for _ in range(n)]
    return out, loaders[0].state_dict()


def test_loader_draws_sources_by_weight(mixed: Path) -> None:
    ld = ShardedLoader(mixed, "train", 32, 16, 16, seed=5)
    assert ld.mixture == [1.0, 3.0]
    ids = ld.sample_ids(np.arange(8 * BLOCK))
    small = ids >= ld._first[1]
    assert abs(small.mean() - 0.75) < 1 / BLOCK + 1e-9
    # Samples of the small source hold its text (bytes "small"), of the big one "BIG".
    x, _ = ld.next_batch()[0]
    rows = ["".join(map(chr, r.tolist())) for r in x]
    from_small = ld.sample_ids(np.arange(16)) >= ld._first[1]
    for row, s in zip(rows, from_small):
        assert ("BIG" not in row) if s else ("small" not in row), row


@pytest.mark.parametrize("W,mb", [(2, 4), (4, 2)])
def test_mixture_order_independent_of_world_size_and_resumable(mixed: Path, W: int, mb: int) -> None:
    ref, _ = steps(mixed, 1, 16, 6)
    got, _ = steps(mixed, W, mb, 6)
    for a, b in zip(ref, got):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    _, state = steps(mixed, 1, 8, 3)  # stop mid-epoch, resume with another world size
    resumed, _ = steps(mixed, W, mb, 3, state=state)
    for a, b in zip(ref[3:], resumed):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_changed_weights_refuse_a_strict_resume(mixed: Path, tmp_path: Path) -> None:
    _, state = steps(mixed, 1, 16, 2)
    doc = json.loads((mixed / "mixture.json").read_text())
    doc["sources"][1]["weight"] = 1.0
    other = tmp_path / "other"
    other.mkdir()
    for sub in mixed.iterdir():
        if sub.is_dir():
            (other / sub.name).symlink_to(sub)
    (other / "mixture.json").write_text(json.dumps(doc))
    ld = ShardedLoader(other, "train", 32, 16, 16, seed=5)
    with pytest.raises(ValueError, match="data_fingerprint"):
        ld.load_state_dict(state)


def test_mixture_val_reads_every_source_in_order(mixed: Path) -> None:
    ld = ShardedLoader(mixed, "val", 32, 4, 4)
    assert not ld.shuffle and len(ld.streams) == 2 and ld.n_samples == ld._first[-1]
    rows = torch.cat([x for batch in ld.eval_batches() for x, _ in batch])[: ld.n_samples]
    want = [st.window(k * 32, 32) for st, n in zip(ld.streams, np.diff(ld._first)) for k in range(n)]
    np.testing.assert_array_equal(rows.numpy(), np.stack(want).astype(np.int64))


@pytest.mark.parametrize("text,msg", [
    ("sources:\n  - {path: a.jsonl, weight: 0}\n", "sources[0]: weight must be a finite number > 0, got 0"),
    ("sources:\n  - {path: a.jsonl, weight: -1}\n", "weight must be a finite number > 0"),
    ("sources:\n  - {weight: 1}\n", "sources[0]: expected a mapping with 'path'"),
    ("sources:\n  - {path: a.jsonl, wieght: 1}\n", "expected a mapping with 'path'"),
    ("sources: []\n", "expected 'sources:' with a list"),
    ("sources:\n  - {path: a, weight: 1}\n  - {path: b, weight: 0.0001}\n", "below 1/4096"),
    ("sources: [\n", "not valid YAML"),
])
def test_bad_mixture_files(tmp_path: Path, text: str, msg: str) -> None:
    f = tmp_path / "m.yaml"
    f.write_text(text)
    with pytest.raises(DataPrepError) as e:
        read_mixture_file(f)
    assert msg in str(e.value) and str(f) in str(e.value) and "\n" not in str(e.value)


def test_a_missing_source_fails_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "m.yaml").write_text("sources:\n  - {path: nope/*.parquet, weight: 1}\n")
    with pytest.raises(DataPrepError, match="no input files match"):
        prepare_mixture(tmp_path / "o", read_mixture_file(tmp_path / "m.yaml"), BYTE, 0.1, log=None)


def test_data_mixture_key_prepares_on_first_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """pretrain's data step with data.mixture set: each source prepared, then the mixture used as is."""
    from llm_dist.config import load_config
    from llm_dist.pretrain import prepare_data

    corpus(tmp_path / "a.jsonl", "AAA", 80)
    corpus(tmp_path / "b.jsonl", "BBB", 80)
    (tmp_path / "m.yaml").write_text("sources:\n  - {path: a.jsonl, weight: 2}\n  - {path: b.jsonl, weight: 1}\n")
    cfg = load_config(None, [f"data.mixture={tmp_path / 'm.yaml'}", f"data.dir={tmp_path / 'd'}",
                             "model.block_size=16", "data.source=/nonexistent"])
    logs: list[str] = []
    import llm_dist.distributed as D
    monkeypatch.setattr(D, "print0", logs.append)
    data_dir = prepare_data(cfg, BYTE)
    prepare_data(cfg, BYTE)  # second run: nothing rebuilt
    assert sum("prepare_data done" in ln for ln in logs) == 2, logs
    ld = ShardedLoader(data_dir, "train", 16, 8, 8)
    assert ld.mixture == [2.0, 1.0] and sorted(p.name for p in Path(data_dir).iterdir() if p.is_dir()) == ["00-a", "01-b"]
