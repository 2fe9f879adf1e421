"""Data preparation: token counts vs. direct tokenization, EOT placement, split rules, dtype, crash safety,
idempotence, and one-line errors for bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from llm_dist.data import (
    DataIndexError,
    DataPrepError,
    ShardedLoader,
    dtype_for_vocab,
    ensure_prepared,
    prepare_dataset,
    read_index,
)
from llm_dist.data import index as index_mod
from llm_dist.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SHAKESPEARE = ROOT / "data" / "tinyshakespeare" / "input.txt"
BYTE = ByteTokenizer()


def read_split(out: Path, split: str) -> np.ndarray:
    """A split's tokens straight from the shard files, independent of the loader."""
    idx = json.loads((out / "index.json").read_text())
    parts = [np.fromfile(out / s["file"], dtype=idx["dtype"]) for s in idx["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=idx["dtype"])


def reference_val(text: str, val_fraction: float) -> bool:
    """The documented split rule, re-derived here rather than imported."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(h, "big") < val_fraction * 2**64


def expected_stream(tok: Tokenizer, docs: list[str]) -> list[int]:
    out: list[int] = []
    for d in docs:
        out += tok.encode_ordinary(d) + [tok.eot_id]
    return out


def gpt2_or_skip() -> Tokenizer:
    try:
        return load_tokenizer("gpt2")
    except Exception as e:  # the GPT-2 tokenizer is optional for these tests
        pytest.skip(f"gpt2 tokenizer unavailable: {e}")


# --- Tiny Shakespeare: the character split and exact token counts -------------------------------------

def test_tinyshakespeare_byte_char_split(tmp_path: Path) -> None:
    text = SHAKESPEARE.read_text(encoding="utf-8")
    assert len(text) == 1_115_394
    t0 = time.perf_counter()
    idx = ensure_prepared(tmp_path / "ts", str(SHAKESPEARE), "byte", 0.1, log=None)
    elapsed = time.perf_counter() - t0
    assert elapsed < 10.0, f"Tiny Shakespeare byte preparation took {elapsed:.1f}s"
    rule = idx["split_rule"]
    assert (rule["kind"], rule["train_chars"], rule["val_chars"]) == ("chars", 1_003_854, 111_540)
    train, val = read_split(tmp_path / "ts", "train"), read_split(tmp_path / "ts", "val")
    # One document per split: its bytes, then EOT.
    assert train.tolist() == list(text[:1_003_854].encode()) + [256]
    assert val.tolist() == list(text[1_003_854:].encode()) + [256]
    assert idx["splits"]["train"]["tokens"] == train.size and idx["total_tokens"] == train.size + val.size
    assert idx["dtype"] == "uint16" and idx["vocab_size"] == 257 and idx["eot_id"] == 256
    assert idx["tokenizer"]["fingerprint"] == BYTE.fingerprint()
    assert idx["tokenizer"]["definition"] == BYTE.definition() and idx["tokenizer"]["spec"] == "byte"


def test_tinyshakespeare_gpt2_chunked_parallel_equals_direct(tmp_path: Path) -> None:
    tok = gpt2_or_skip()
    text = SHAKESPEARE.read_text(encoding="utf-8")
    direct_train = tok.encode_ordinary(text[:1_003_854])
    direct_val = tok.encode_ordinary(text[1_003_854:])
    assert (len(direct_train), len(direct_val)) == (301_966, 36_059)  # data/tinyshakespeare/README.md
    # Small chunks and two processes: chunk cuts must not change a single token.
    idx = prepare_dataset(tmp_path / "g", str(SHAKESPEARE), tok, 0.1, num_proc=2, chunk_chars=20_000,
                          shard_tokens=50_000, log=None)
    assert read_split(tmp_path / "g", "train").tolist() == direct_train + [tok.eot_id]
    assert read_split(tmp_path / "g", "val").tolist() == direct_val + [tok.eot_id]
    assert [s["tokens"] for s in idx["splits"]["train"]["shards"]] == [50_000] * 6 + [1_967]


def test_byte_chunk_cuts_and_num_proc_do_not_change_bytes(tmp_path: Path) -> None:
    a = prepare_dataset(tmp_path / "a", str(SHAKESPEARE), "byte", 0.25, log=None)
    b = prepare_dataset(tmp_path / "b", str(SHAKESPEARE), "byte", 0.25, num_proc=2, chunk_chars=7_777,
                        shard_tokens=123_457, log=None)
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "a", split), read_split(tmp_path / "b", split))
    assert a["split_rule"] == b["split_rule"] and a["split_rule"]["train_chars"] == int(1_115_394 * 0.75)
    assert len(b["splits"]["train"]["shards"]) == -(-a["splits"]["train"]["tokens"] // 123_457)


# --- many documents: JSONL and multi-file inputs --------------------------------------------------------

def make_docs(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "δέλτα", "日本", "\n", "  ", "end."]
    return [" ".join(rng.choice(words, size=int(rng.integers(1, 40)))) for _ in range(n)]


@pytest.mark.parametrize("num_proc", [1, 2])
def test_jsonl_documents_split_by_hash_with_eot(tmp_path: Path, num_proc: int) -> None:
    docs = make_docs(300)
    docs[7] = docs[3]  # an exact duplicate must land in the same split
    rows = [{"text": d, "id": i} for i, d in enumerate(docs)]
    rows.insert(10, {"text": "", "id": -1})  # empty documents are skipped
    src = tmp_path / "corpus.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n", encoding="utf-8")
    idx = prepare_dataset(tmp_path / "out", str(src), BYTE, 0.2, shard_tokens=500, num_proc=num_proc,
                          chunk_chars=1_000, log=None)
    want_val = [d for d in docs if reference_val(d, 0.2)]
    want_train = [d for d in docs if not reference_val(d, 0.2)]
    assert 30 < len(want_val) < 90  # the hash rule really splits ~20%
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(BYTE, want_train)
    assert read_split(tmp_path / "out", "val").tolist() == expected_stream(BYTE, want_val)
    assert idx["splits"]["train"]["documents"] == len(want_train)
    assert idx["split_rule"]["kind"] == "documents"
    sizes = [s["tokens"] for s in idx["splits"]["train"]["shards"]]
    assert all(n == 500 for n in sizes[:-1]) and 0 < sizes[-1] <= 500 and len(sizes) > 3


def test_text_field_and_glob_of_files(tmp_path: Path) -> None:
    tok = gpt2_or_skip()
    docs = make_docs(12, seed=1)
    for i, d in enumerate(docs):  # names sort in this order
        (tmp_path / f"doc_{i:02d}.txt").write_text(d, encoding="utf-8")
    prepare_dataset(tmp_path / "out", str(tmp_path / "doc_*.txt"), tok, 0.3, log=None)
    want = [d for d in docs if not reference_val(d, 0.3)]
    assert read_split(tmp_path / "out", "train").tolist() == expected_stream(tok, want)

    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps({"body": d}) for d in docs), encoding="utf-8")
    prepare_dataset(tmp_path / "out2", str(tmp_path / "c.jsonl"), tok, 0.0, text_field="body", log=None)
    assert read_split(tmp_path / "out2", "train").tolist() == expected_stream(tok, docs)
    assert list(read_index(tmp_path / "out2")["splits"]) == ["train"]  # no val split at val_fraction 0


def test_fsspec_memory_url(tmp_path: Path) -> None:
    import fsspec

    with fsspec.open("memory://llm_dist_test/a.txt", "wt") as f:
        f.write("hello world\nsecond line\n")
    prepare_dataset(tmp_path / "m", "memory://llm_dist_test/*.txt", BYTE, 0.5, log=None)
    text = "hello world\nsecond line\n"
    n = int(len(text) * 0.5)
    assert read_split(tmp_path / "m", "train").tolist() == list(text[:n].encode()) + [256]
    assert read_index(tmp_path / "m")["recipe"]["sources"][0]["url"] == "memory:///llm_dist_test/a.txt"


# --- dtype ----------------------------------------------------------------------------------------------

class WideTokenizer(Tokenizer):
    """A toy tokenizer with 70,001 ids whose ids do not fit in uint16."""

    name = "wide"
    special_tokens = {"<|endoftext|>": 70_000}

    @property
    def vocab_size(self) -> int:
        return 70_001

    def encode_ordinary(self, text: str) -> list[int]:
        return [60_000 + ord(c) % 10_000 for c in text]

    def decode_bytes(self, ids) -> bytes:
        return b""

    def definition(self) -> dict:
        return {"type": "wide"}


def test_dtype_choice(tmp_path: Path) -> None:
    assert dtype_for_vocab(256) == np.uint16 and dtype_for_vocab(65_536) == np.uint16
    assert dtype_for_vocab(65_537) == np.uint32
    src = tmp_path / "w.txt"
    src.write_text("wide ids ~~ ÿ", encoding="utf-8")
    tok = WideTokenizer()
    idx = prepare_dataset(tmp_path / "w", str(src), tok, 0.0, log=None)
    assert idx["dtype"] == "uint32"
    assert read_split(tmp_path / "w", "train").tolist() == tok.encode_ordinary(src.read_text()) + [70_000]
    x, y = ShardedLoader(tmp_path / "w", "train", 4, 1, 1, shuffle=False).next_batch()[0]
    assert x.dtype == torch.int64 and x[0].tolist() == tok.encode_ordinary("wide")


# --- crash safety and idempotence -----------------------------------------------------------------------

def test_interrupted_preparation_is_not_prepared(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"text": d}) for d in make_docs(200)), encoding="utf-8")
    finished = []
    real_finish = index_mod.ShardWriter._finish_shard

    def crash_after_two(self):  # "kill" the run once two shards are complete
        if len(finished) == 2:
            raise KeyboardInterrupt
        real_finish(self)
        finished.append(self.shards[-1]["file"])

    monkeypatch.setattr(index_mod.ShardWriter, "_finish_shard", crash_after_two)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(out, str(src), BYTE, 0.1, shard_tokens=300, log=None)
    monkeypatch.undo()
    assert sorted(p.name for p in out.iterdir()) == sorted(finished)  # complete shards only, no temp, no index
    with pytest.raises(DataIndexError, match="no index.json"):
        read_index(out)
    with pytest.raises(DataIndexError, match="not a prepared dataset"):
        ShardedLoader(out, "train", 8, 1, 1)

    # A leftover temp shard (as after a hard kill) is also "not prepared"; the re-run cleans up and builds.
    (out / "train_000002.bin.tmp.99999").write_bytes(b"\x00" * 10)
    (out / "notes.txt").write_text("not ours")
    logs: list[str] = []
    idx = ensure_prepared(out, str(src), BYTE, 0.1, shard_tokens=300, log=logs.append)
    assert any("removed" in m for m in logs)
    names = {p.name for p in out.iterdir()}
    assert not any(".tmp." in n for n in names) and "notes.txt" in names
    assert names - {"notes.txt", "index.json"} == {s["file"] for e in idx["splits"].values() for s in e["shards"]}
    read_index(out)


def test_truncated_shard_detected(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("x" * 1000)
    prepare_dataset(tmp_path / "o", str(src), BYTE, 0.1, shard_tokens=256, log=None)
    shard = tmp_path / "o" / "train_000001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(DataIndexError, match="train_000001.bin.*truncated"):
        read_index(tmp_path / "o")
    shard.unlink()
    with pytest.raises(DataIndexError, match="missing"):
        ShardedLoader(tmp_path / "o", "train", 8, 1, 1)
    # A damaged directory is rebuilt by the next ensure_prepared, even with matching inputs.
    ensure_prepared(tmp_path / "o", str(src), BYTE, 0.1, shard_tokens=256, log=None)
    assert read_split(tmp_path / "o", "train").size == 901


def test_rerun_is_noop_and_mismatch_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("to be or not to be\n" * 50)
    out = tmp_path / "o"
    ensure_prepared(out, str(src), "byte", 0.1, log=None)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    logs: list[str] = []
    ensure_prepared(out, str(src), "byte", 0.1, log=logs.append)
    assert "already prepared" in logs[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before

    with pytest.raises(DataPrepError, match="val_fraction 0.1 -> 0.2.*overwrite"):
        ensure_prepared(out, str(src), "byte", 0.2, log=None)
    tok = gpt2_or_skip()
    with pytest.raises(DataPrepError, match="tokenizer fingerprint"):
        ensure_prepared(out, str(src), tok, 0.1, log=None)
    src.write_text("changed text\n" * 3)
    with pytest.raises(DataPrepError, match="a.txt changed"):
        ensure_prepared(out, str(src), "byte", 0.1, log=None)
    idx = ensure_prepared(out, str(src), tok, 0.1, overwrite=True, log=None)
    assert idx["tokenizer"]["name"] == "gpt2" and idx["splits"]["train"]["tokens"] == len(
        tok.encode_ordinary(("changed text\n" * 3)[: int(39 * 0.9)])) + 1


# --- bad input: one-line errors naming the culprit ------------------------------------------------------

def one_line_error(exc_info: pytest.ExceptionInfo) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_bad_inputs(tmp_path: Path) -> None:
    out = tmp_path / "o"
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(tmp_path / "missing.txt"), BYTE, log=None)
    assert "missing.txt" in one_line_error(e) and "not found" in str(e.value)
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(tmp_path / "*.none"), BYTE, log=None)
    assert "no input files match" in one_line_error(e)

    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(tmp_path / "empty.txt"), BYTE, log=None)
    assert "empty.txt" in one_line_error(e) and "empty" in str(e.value)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"content": "no text key", "id": 3}\n')
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(bad), BYTE, log=None)
    assert f"{bad}:2:" in one_line_error(e) and "'text'" in str(e.value) and "content" in str(e.value)

    bad.write_text('{"text": "ok"}\n\n{"text": "ok"\n')
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(bad), BYTE, log=None)
    assert f"{bad}:3:" in one_line_error(e) and "invalid JSON" in str(e.value)

    bad.write_text('{"text": ["not", "a", "string"]}\n')
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(bad), BYTE, log=None)
    assert f"{bad}:1:" in one_line_error(e) and "list" in str(e.value)
    assert not (out / "index.json").exists()


def test_cli(tmp_path: Path) -> None:
    src = tmp_path / "c.jsonl"
    src.write_text("\n".join(json.dumps({"t": d}) for d in make_docs(50)), encoding="utf-8")
    def run(out: str, field: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, str(ROOT / "tools" / "prepare_data.py"), "-i", str(src), "-o", str(tmp_path / out),
               "--text-field", field, "--shard-tokens", "1000", "--num-proc", "2", "--val-fraction", "0.2"]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)

    r = run("o", "t")
    assert r.returncode == 0, r.stderr
    idx = read_index(tmp_path / "o")
    assert f"train: {idx['splits']['train']['tokens']:,} tokens" in r.stdout
    r = run("o2", "nope")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "'nope'" in r.stderr
    assert not (tmp_path / "o2" / "index.json").exists()


def test_chunk_cuts_preserve_pretokenization() -> None:
    """Every cut `split_at_safe_boundary` picks is a pre-token boundary of GPT-2's and cl100k's patterns."""
    import regex

    from llm_dist.data.sources import split_at_safe_boundary
    from llm_dist.tokenizer import CL100K_PATTERN, GPT2_PATTERN

    rng = np.random.default_rng(0)
    atoms = ["a", "Zq", "7", "!", "?", "'s", " ", "  ", "\n", "\n\n", "\r\n", "\t", " \n", "é", "—"]
    n_cuts = 0
    for _ in range(200):
        text = "".join(rng.choice(atoms, size=60))
        parts, rest = [], text
        while (i := split_at_safe_boundary(rest)) > 0:  # cut from the right, as the streaming reader does
            parts.insert(0, rest[i:])
            rest = rest[:i]
        parts.insert(0, rest)
        n_cuts += len(parts) - 1
        assert "".join(parts) == text
        for pat in (GPT2_PATTERN, CL100K_PATTERN):
            pieces = [p for part in parts for p in regex.findall(pat, part)]
            assert pieces == regex.findall(pat, text), (pat, parts)
    assert n_cuts > 200  # the property was exercised, not vacuously true


def test_training_uses_a_valid_prepared_dir_whatever_the_source(tmp_path: Path) -> None:
    """use_or_prepare (the trainer's rule): a valid index is authoritative; the source only builds one."""
    from llm_dist.data import use_or_prepare

    src, out = tmp_path / "c.txt", tmp_path / "out"
    src.write_text("hello there\nsmall world\n" * 200, encoding="utf-8")
    idx = use_or_prepare(out, str(src), BYTE, 0.1, log=None)
    files = {p.name: p.read_bytes() for p in out.iterdir()}

    def same() -> bool:
        return {p.name: p.read_bytes() for p in out.iterdir()} == files

    logs: list[str] = []
    os.utime(src, (1, 1))  # touched: a new mtime, same content
    assert use_or_prepare(out, str(src), BYTE, 0.1, log=logs.append) == idx and logs == [] and same()
    src.write_text("hello there\nsmall world\n" * 201, encoding="utf-8")  # changed: one note, data used as is
    assert use_or_prepare(out, str(src), BYTE, 0.1, log=logs.append) == idx and same()
    assert len(logs) == 1 and f"{src} changed since (size 4800 -> 4824 bytes)" in logs[0]
    assert "tools/prepare_data.py --overwrite" in logs[0]
    src.unlink()  # missing: nothing needed
    assert use_or_prepare(out, str(src), BYTE, 0.1, log=None) == idx and same()

    victim = out / idx["splits"]["val"]["shards"][0]["file"]
    victim.write_bytes(victim.read_bytes()[:10])  # damaged and no source: both named, nothing touched
    with pytest.raises(DataPrepError) as e:
        use_or_prepare(out, str(src), BYTE, 0.1, log=None)
    assert f"data.dir {out} is damaged ({victim}: 10 bytes" in str(e.value)
    assert f"data.source {src}: input file not found" in str(e.value)
    src.write_text("fresh text\nfor a rebuild\n" * 100, encoding="utf-8")  # damaged, source back: rebuilt
    assert use_or_prepare(out, str(src), BYTE, 0.1, log=None)["recipe"]["sources"][0]["size"] == src.stat().st_size


def test_too_little_text_is_refused_before_anything_is_kept(tmp_path: Path) -> None:
    src, out = tmp_path / "tiny.txt", tmp_path / "new" / "out"
    src.write_text("hello world!", encoding="utf-8")
    with pytest.raises(DataPrepError, match=r"train 11, val 3 tokens .* at least 17 tokens"):
        prepare_dataset(out, str(src), BYTE, 0.1, log=None, min_split_tokens=17)
    assert not out.exists()
