"""Input formats of data preparation: parquet, Arrow / datasets folders, JSONL (.gz/.zst) and text give the
same tokens for the same documents; parquet is streamed batch by batch; unknown inputs are refused in one line
with nothing left behind; --text-field; progress percentage and ETA."""

from __future__ import annotations

import gzip
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")
zstandard = pytest.importorskip("zstandard")

from llm_dist.cli import tool_main  # noqa: E402
from llm_dist.data import DataPrepError, prepare_dataset, read_index  # noqa: E402
from llm_dist.data import readers  # noqa: E402
from llm_dist.tokenizer import ByteTokenizer  # noqa: E402
from tests.helpers import load_tool  # noqa: E402

BYTE = ByteTokenizer()


def make_docs(n: int = 120) -> list[str]:
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "γάμμα", "delta", "中文", "naïve", "\n", "x" * 30, "😀", "end."]
    return [f"doc {i}: " + " ".join(rng.choice(words, size=int(rng.integers(3, 40)))) for i in range(n)]


def tokens(out: Path) -> dict[str, np.ndarray]:
    idx = read_index(out)
    return {s: np.concatenate([np.fromfile(out / sh["file"], dtype=idx["dtype"]) for sh in e["shards"]])
            for s, e in idx["splits"].items()}


def write_datasets_folder(folder: Path, table, n_files: int = 2) -> None:
    """The layout of datasets' Dataset.save_to_disk: data-*.arrow IPC streams, state.json, dataset_info.json."""
    folder.mkdir()
    rows = table.num_rows
    names = []
    for k in range(n_files):
        part = table.slice(k * rows // n_files, (k + 1) * rows // n_files - k * rows // n_files)
        name = f"data-{k:05d}-of-{n_files:05d}.arrow"
        with pa.ipc.new_stream(folder / name, part.schema) as w:
            for b in part.to_batches(max_chunksize=25):
                w.write_batch(b)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names],
                                                   "_fingerprint": "0", "_split": None}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"dtype": "string"}}}))


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    d = tmp_path_factory.mktemp("inputs")
    docs = make_docs()
    jsonl = "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(docs)).encode()
    (d / "c.jsonl").write_bytes(jsonl)
    (d / "c.jsonl.gz").write_bytes(gzip.compress(jsonl))
    (d / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(jsonl))
    (d / "c.json").write_bytes(jsonl)  # Hugging Face's usual name for JSON lines
    table = pa.table({"id": list(range(len(docs))), "text": docs})
    pq.write_table(table, d / "c.parquet", row_group_size=30)  # 4 row groups
    (d / "parquet_no_ext").write_bytes((d / "c.parquet").read_bytes())  # found by its magic bytes
    with pa.ipc.new_file(d / "c.arrow", table.schema) as w:
        for b in table.to_batches(max_chunksize=40):
            w.write_batch(b)
    write_datasets_folder(d / "saved", table)
    (d / "txt").mkdir()
    for i, t in enumerate(docs):
        (d / "txt" / f"doc_{i:04d}.txt").write_text(t, encoding="utf-8")
    return {"dir": str(d), "jsonl": str(d / "c.jsonl"), "gz": str(d / "c.jsonl.gz"), "zst": str(d / "c.jsonl.zst"),
            "json": str(d / "c.json"), "parquet": str(d / "c.parquet"), "magic": str(d / "parquet_no_ext"),
            "arrow": str(d / "c.arrow"), "datasets": str(d / "saved"), "text": str(d / "txt" / "doc_*.txt")}


@pytest.mark.parametrize("fmt,kind", [("gz", "jsonl"), ("zst", "jsonl"), ("json", "jsonl"), ("parquet", "parquet"),
                                      ("magic", "parquet"), ("arrow", "arrow"), ("datasets", "arrow"),
                                      ("text", "text")])
def test_every_format_gives_the_jsonl_tokens(tmp_path: Path, inputs: dict[str, str], fmt: str, kind: str) -> None:
    ref = prepare_dataset(tmp_path / "ref", inputs["jsonl"], BYTE, 0.2, log=None)
    idx = prepare_dataset(tmp_path / fmt, inputs[fmt], BYTE, 0.2, log=None, num_proc=2 if fmt == "parquet" else 1)
    assert {s["kind"] for s in idx["recipe"]["sources"]} == {kind}
    want, got = tokens(tmp_path / "ref"), tokens(tmp_path / fmt)
    assert ref["splits"]["val"]["documents"] > 0
    for split in ("train", "val"):
        np.testing.assert_array_equal(got[split], want[split])
    if fmt == "datasets":  # the folder stands for its data files, in state.json's order
        assert [Path(s["url"]).name for s in idx["recipe"]["sources"]] == ["data-00000-of-00002.arrow",
                                                                            "data-00001-of-00002.arrow"]


def test_parquet_is_streamed_batch_by_batch(tmp_path: Path, inputs: dict[str, str], monkeypatch) -> None:
    """Only the text column is read, at most BATCH_ROWS rows at a time, and only as documents are consumed."""
    calls: list[dict] = []
    batches: list[int] = []
    real = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        calls.append(kwargs)
        for b in real(self, *args, **kwargs):
            batches.append(b.num_rows)
            yield b

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    monkeypatch.setattr(readers, "BATCH_ROWS", 16)
    docs = readers.iter_documents(inputs["parquet"], "parquet", "text")
    first, frac = next(docs)
    assert first == make_docs()[0] and batches == [16] and 0 < frac < 0.2  # one batch read, not the file
    assert calls == [{"batch_size": 16, "columns": ["text"], "use_threads": False}]
    rest = list(docs)
    assert len(rest) == 119 and rest[-1][1] == 1.0
    assert max(batches) <= 16 and len(batches) >= 120 // 16
    fracs = [f for _, f in rest]
    assert fracs == sorted(fracs)


def test_text_field(tmp_path: Path, inputs: dict[str, str]) -> None:
    docs = make_docs(40)
    pq.write_table(pa.table({"content": docs, "n": list(range(40))}), tmp_path / "x.parquet")
    (tmp_path / "x.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
    prepare_dataset(tmp_path / "a", str(tmp_path / "x.parquet"), BYTE, 0.2, text_field="content", log=None)
    prepare_dataset(tmp_path / "b", str(tmp_path / "x.jsonl"), BYTE, 0.2, log=None)
    np.testing.assert_array_equal(tokens(tmp_path / "a")["train"], tokens(tmp_path / "b")["train"])
    out = tmp_path / "new" / "deeper" / "o"
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(out, str(tmp_path / "x.parquet"), BYTE, 0.2, log=None)
    msg = str(e.value)
    assert "\n" not in msg and "'text'" in msg and "columns: content, n" in msg and "--text-field" in msg
    assert not (tmp_path / "new").exists()
    pq.write_table(pa.table({"text": list(range(3))}), tmp_path / "ints.parquet")
    with pytest.raises(DataPrepError, match="'text' is int64, expected a string column"):
        prepare_dataset(out, str(tmp_path / "ints.parquet"), BYTE, 0.2, log=None)


def run_tool(argv: list[str], capsys) -> tuple[int, str]:
    mod = load_tool("prepare_data")
    rc = tool_main(mod.main, argv)
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("case", ["random", "csv", "hf", "folder", "datasetdict", "fake_parquet", "zip_gz"])
def test_unknown_inputs_are_refused_in_one_line(tmp_path: Path, capsys, case: str) -> None:
    src = tmp_path / {"random": "blob", "csv": "t.csv", "hf": "", "folder": "plain", "datasetdict": "dd",
                      "fake_parquet": "f.parquet", "zip_gz": "x.jsonl.gz"}[case]
    if case == "random":
        src.write_bytes(os.urandom(4096))
    elif case == "csv":
        src.write_text("text,id\nhello,1\n")
    elif case in ("folder", "datasetdict"):
        (src / "train").mkdir(parents=True)
        (src / "a.txt").write_text("hi")
        if case == "datasetdict":
            (src / "dataset_dict.json").write_text('{"splits": ["train"]}')
    elif case == "fake_parquet":
        src.write_text("not parquet at all")
    elif case == "zip_gz":
        src.write_bytes(gzip.compress(os.urandom(2000)))
    spec = "hf://datasets/HuggingFaceFW/fineweb-edu/sample/10BT" if case == "hf" else str(src)
    out = tmp_path / "out" / "o"
    rc, err = run_tool(["-i", spec, "-o", str(out), "--block-size", "8"], capsys)
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    if case == "datasetdict":
        assert "splits: train" in err and f"{src}/train" in err
    else:
        assert "parquet" in err and "JSONL" in err and "text" in err and spec in err
    assert not (tmp_path / "out").exists()


def test_missing_pyarrow_says_what_to_install(tmp_path: Path, inputs: dict[str, str], monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` now raises ImportError
    with pytest.raises(DataPrepError) as e:
        prepare_dataset(tmp_path / "o", inputs["parquet"], BYTE, 0.2, log=None)
    assert "pip install pyarrow" in str(e.value) and inputs["parquet"] in str(e.value)
    assert not (tmp_path / "o").exists()


def test_progress_shows_percentage_and_eta(tmp_path: Path, inputs: dict[str, str]) -> None:
    lines: list[str] = []
    prepare_dataset(tmp_path / "o", [inputs["parquet"], inputs["gz"]], BYTE, 0.2, log=lines.append,
                    progress_interval=1e-9, chunk_chars=500)
    progress = [ln for ln in lines if ln.startswith("prepare_data progress:")]
    assert len(progress) >= 5, lines
    pcts = [float(ln.split(":", 1)[1].split("%")[0]) for ln in progress]
    assert pcts == sorted(pcts) and pcts[-1] > 50 and all("eta " in ln for ln in progress)
