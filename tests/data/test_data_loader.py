"""ShardedLoader: windows and shift against a direct read, sample order independent of world size and
micro-batch, exact (elastic) resume, epoch rollover, evaluation batches, clear errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.data import DataIndexError, ShardedLoader, ensure_prepared, write_token_dataset

ROOT = Path(__file__).resolve().parents[2]


def make_stream(tmp_path: Path, n_tokens: int, shard_tokens: int, vocab: int = 50_000, seed: int = 0,
                name: str = "d") -> tuple[Path, np.ndarray]:
    """Random tokens written through the real writer, in uneven pieces; returns (dir, the tokens)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, size=n_tokens)
    cuts = np.sort(rng.integers(0, n_tokens, size=7))
    out = tmp_path / name
    write_token_dataset(out, {"train": np.split(tokens, cuts), "val": [tokens[: n_tokens // 3]]},
                        vocab, vocab - 1, shard_tokens)
    return out, tokens


def ref_perm(seed: int, epoch: int, n: int) -> np.ndarray:
    """The documented order rule, spelled out independently of the loader."""
    return np.random.Generator(np.random.PCG64([seed, epoch])).permutation(n)


def global_step(data: Path, W: int, mb: int, steps: int, B: int = 8, T: int = 16, seed: int = 3,
                split: str = "train", sd: dict | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run W ranks for `steps` steps; per step, the concatenation over ranks (rank order) of their micro-batches."""
    loaders = [ShardedLoader(data, split, T, B, mb, rank=r, world_size=W, seed=seed) for r in range(W)]
    if sd is not None:
        for ld in loaders:
            ld.load_state_dict(sd)
    out = []
    for _ in range(steps):
        per_rank = [ld.next_batch() for ld in loaders]
        assert all(len(b) == B // (W * mb) for b in per_rank)
        xs = torch.cat([x for b in per_rank for x, _ in b])
        ys = torch.cat([y for b in per_rank for _, y in b])
        out.append((xs, ys))
    return out


def test_windows_and_shift_match_direct_read(tmp_path: Path) -> None:
    T, seed = 100, 5
    data, tokens = make_stream(tmp_path, 5_000, shard_tokens=37)  # windows span several tiny shards
    ld = ShardedLoader(data, "train", T, 4, 2, seed=seed)
    n = (5_000 - 1) // T
    assert ld.n_samples == n and ld.n_tokens == 5_000 and ld.tokens_per_step == 400
    order = np.concatenate([ref_perm(seed, e, n) for e in range(3)])
    pos = 0
    for _ in range(30):  # 120 positions: across the epoch boundary at 49
        for x, y in ld.next_batch():
            assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (2, T)
            assert x.is_contiguous() and y.is_contiguous()
            for row in range(2):
                s = order[pos] * T
                assert np.array_equal(x[row].numpy(), tokens[s : s + T])
                assert np.array_equal(y[row].numpy(), tokens[s + 1 : s + T + 1])
                pos += 1
    assert ld.epoch == 2 and ld.state_dict()["index"] == 120 - 2 * n


@pytest.mark.parametrize("W,mb", [(1, 1), (1, 4), (2, 1), (2, 2), (2, 4), (4, 1), (4, 2)])
def test_order_independent_of_world_size(tmp_path: Path, W: int, mb: int) -> None:
    data, _ = make_stream(tmp_path, 1_000, shard_tokens=97)  # 62 samples of 16: epoch ends mid-batch
    ref = global_step(data, 1, 8, steps=20)
    got = global_step(data, W, mb, steps=20)
    for (rx, ry), (gx, gy) in zip(ref, got):
        assert torch.equal(rx, gx) and torch.equal(ry, gy)


def test_each_epoch_covers_every_sample_once(tmp_path: Path) -> None:
    T, n_tokens = 16, 1_000
    out = tmp_path / "ar"  # token k at position k, so a window's first token names it
    write_token_dataset(out, {"train": [np.arange(n_tokens)]}, 65_536, 0, 128)
    n = (n_tokens - 1) // T
    ld = ShardedLoader(out, "train", T, 12, 3, seed=11)  # 12 does not divide n = 62
    starts = []
    while len(starts) < 4 * n:
        starts += [int(v) for x, _ in ld.next_batch() for v in x[:, 0]]
    ids = np.array(starts[: 4 * n]) // T
    epochs = ids.reshape(4, n)
    for e in range(4):
        assert sorted(epochs[e].tolist()) == list(range(n))
        assert np.array_equal(epochs[e], ref_perm(11, e, n))
    assert not np.array_equal(epochs[0], epochs[1])


@pytest.mark.parametrize("W2,mb2", [(1, 8), (2, 2), (4, 1)])
def test_exact_resume_across_world_sizes(tmp_path: Path, W2: int, mb2: int) -> None:
    data, _ = make_stream(tmp_path, 1_000, shard_tokens=97)
    full = global_step(data, 1, 8, steps=15)
    # Interrupted run on 2 ranks: 9 steps, then save (every rank must report the same global position).
    loaders = [ShardedLoader(data, "train", 16, 8, 2, rank=r, world_size=2, seed=3) for r in range(2)]
    for _ in range(9):
        for ld in loaders:
            ld.next_batch()
    sds = [ld.state_dict() for ld in loaders]
    assert sds[0] == sds[1] and (sds[0]["epoch"], sds[0]["index"]) == (1, 72 - 62)
    resumed = global_step(data, W2, mb2, steps=6, sd=sds[0])
    for (rx, ry), (gx, gy) in zip(full[9:], resumed):
        assert torch.equal(rx, gx) and torch.equal(ry, gy)


def test_set_global_batch_keeps_sample_position(tmp_path: Path) -> None:
    data, _ = make_stream(tmp_path, 1_000, shard_tokens=97)
    a = ShardedLoader(data, "train", 16, 4, 2, seed=3)
    ref = torch.cat([x for _ in range(6) for x, _ in a.next_batch()])  # 24 samples, batch 4
    b = ShardedLoader(data, "train", 16, 4, 2, seed=3)
    b.next_batch()
    b.set_global_batch(8)  # ramp: 4 + 8 + 8 + 4 = the same 24 positions
    got = [x for x, _ in b.next_batch() + b.next_batch()]
    b.set_global_batch(4)
    got += [x for x, _ in b.next_batch()]
    assert torch.equal(torch.cat(got), ref[4:])
    with pytest.raises(ValueError, match="multiple of world_size \\* micro_batch"):
        b.set_global_batch(5)


def test_eval_batches_deterministic_in_order_and_world_size_free(tmp_path: Path) -> None:
    data, tokens = make_stream(tmp_path, 1_000, shard_tokens=97)
    val_tokens = tokens[: 1_000 // 3]
    T, B = 16, 8
    n = (len(val_tokens) - 1) // T  # 20 samples -> 3 steps, the last wrapping to samples 0..3
    runs = {}
    for W, mb in [(1, 8), (2, 2), (4, 1)]:
        loaders = [ShardedLoader(data, "val", T, B, mb, rank=r, world_size=W, seed=9) for r in range(W)]
        assert not loaders[0].shuffle  # val defaults to in-order
        loaders[0].next_batch()  # the training position must not matter
        steps = list(zip(*[list(ld.eval_batches()) for ld in loaders]))
        runs[W] = [torch.cat([x for rank_b in step for x, _ in rank_b]) for step in steps]
        assert len(list(loaders[0].eval_batches(2))) == 2 and len(list(loaders[0].eval_batches(50))) == 3
    expect = np.stack([val_tokens[(i % n) * T : (i % n) * T + T] for i in range(24)])
    for W, steps in runs.items():
        assert np.array_equal(torch.cat(steps).numpy(), expect), W


def test_unshuffled_train_reads_in_order(tmp_path: Path) -> None:
    data, tokens = make_stream(tmp_path, 500, shard_tokens=64)
    (x, y), = ShardedLoader(data, "train", 10, 3, 3, shuffle=False).next_batch()
    assert np.array_equal(x.numpy(), tokens[:30].reshape(3, 10))
    assert np.array_equal(y.numpy(), tokens[1:31].reshape(3, 10))


def test_shards_are_memory_mapped(tmp_path: Path) -> None:
    data, _ = make_stream(tmp_path, 2_000, shard_tokens=500)
    ld = ShardedLoader(data, "train", 16, 4, 4, shuffle=False)
    ld.next_batch()
    mapped = [m for m in ld.stream._maps if m is not None]
    assert mapped and all(isinstance(m.base, np.memmap) for m in mapped)  # views of mappings, not copies


def test_tinyshakespeare_end_to_end(tmp_path: Path) -> None:
    src = ROOT / "data" / "tinyshakespeare" / "input.txt"
    ensure_prepared(tmp_path / "ts", str(src), "byte", 0.1, log=None)
    text = src.read_bytes()
    ld = ShardedLoader(tmp_path / "ts", "train", 64, 4, 4, seed=1)
    assert ld.vocab_size == 257 and ld.eot_id == 256 and ld.tokenizer_info["name"] == "byte"
    (x, y), = ld.next_batch()
    for row in range(4):
        piece = bytes(x[row].tolist())
        assert piece in text and bytes(y[row, :-1].tolist()) == piece[1:]


def test_errors_are_clear(tmp_path: Path) -> None:
    data, _ = make_stream(tmp_path, 1_000, shard_tokens=97)
    with pytest.raises(DataIndexError, match="no index.json"):
        ShardedLoader(tmp_path / "nowhere", "train", 16, 8, 1)
    with pytest.raises(DataIndexError, match="split 'test' not present \\(splits: train, val\\)"):
        ShardedLoader(data, "test", 16, 8, 1)
    with pytest.raises(DataIndexError, match="has 333 tokens, fewer than seq_len \\+ 1 = 334"):
        ShardedLoader(data, "val", 333, 8, 1)
    with pytest.raises(ValueError, match="global_batch 12 must be a positive multiple of .* = 8"):
        ShardedLoader(data, "train", 16, 12, 2, rank=1, world_size=4)
    with pytest.raises(ValueError, match="rank 4 is outside world_size 4"):
        ShardedLoader(data, "train", 16, 8, 2, rank=4, world_size=4)
    sd = ShardedLoader(data, "train", 16, 8, 1, seed=1).state_dict()
    with pytest.raises(ValueError, match="seq_len 16 != 32"):
        ShardedLoader(data, "train", 32, 8, 1, seed=1).load_state_dict(sd)
    with pytest.raises(ValueError, match="seed 1 != 2"):
        ShardedLoader(data, "train", 16, 8, 1, seed=2).load_state_dict(sd)
    other, _ = make_stream(tmp_path, 1_000, shard_tokens=97, seed=1, name="other")
    with pytest.raises(ValueError, match="data_fingerprint"):
        ShardedLoader(other, "train", 16, 8, 1, seed=1).load_state_dict(sd)


def test_resume_on_resharded_copy(tmp_path: Path) -> None:
    """The same tokens with another shard size are the same data: a saved position carries over."""
    a, _ = make_stream(tmp_path, 1_000, shard_tokens=97, name="a")
    b, _ = make_stream(tmp_path, 1_000, shard_tokens=1_000, name="b")
    la, lb = ShardedLoader(a, "train", 16, 8, 4, seed=2), ShardedLoader(b, "train", 16, 8, 4, seed=2)
    for _ in range(5):
        la.next_batch()
    lb.load_state_dict(la.state_dict())
    for (xa, ya), (xb, yb) in zip(la.next_batch(), lb.next_batch()):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_ids_past_the_vocabulary_are_refused_naming_the_shard(tmp_path: Path, monkeypatch) -> None:
    """A shard overwritten in place (right size, wrong ids) is caught when the loader opens, not as an
    IndexError in the embedding; shards too large for the start-up scan are checked batch by batch."""
    import llm_dist.data.loader as loader_mod

    data, _ = make_stream(tmp_path, 1_000, shard_tokens=97)
    shard = data / "val_000001.bin"
    arr = np.fromfile(shard, dtype=np.uint16)
    arr[5] = 60_000
    arr.tofile(shard)
    ShardedLoader(data, "train", 16, 8, 1)  # the other split is fine
    with pytest.raises(DataIndexError, match=f"{shard}: token id 60000 at position 5 is outside the vocabulary"):
        ShardedLoader(data, "val", 16, 8, 1)
    monkeypatch.setattr(loader_mod, "SCAN_IDS_MAX_TOKENS", 0)
    val = ShardedLoader(data, "val", 16, 8, 1)  # not scanned at start-up any more
    with pytest.raises(DataIndexError, match=f"{shard}: token id 60000 at position 5"):
        for _ in val.eval_batches():
            pass
