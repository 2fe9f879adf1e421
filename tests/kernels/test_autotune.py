"""Attention launch configurations: LLM_DIST_AUTOTUNE parsing, bucketed keys, the per-GPU JSON cache on disk."""

from __future__ import annotations

import importlib
import json
import warnings
from pathlib import Path

import pytest
import torch

from llm_dist.kernels import autotune
from llm_dist.kernels.autotune import Config, Tuner, autotune_mode, cache_path, load_cache, seq_bucket, tune_key

from tests.kernels.kernel_helpers import needs_triton, quiet_interpreter

GPU = "NVIDIA Test GPU 80GB"
A, B, C, D = Config(128, 64, 8, 3), Config(64, 64, 4, 3), Config(32, 16, 4, 1), Config(16, 16, 1, 1)


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_CACHE, str(tmp_path / "cache"))
    monkeypatch.delenv(autotune.ENV_MODE, raising=False)
    monkeypatch.setattr(autotune, "_WARNED", set())


class _Kernel:
    """A fake kernel: records launches; `bench` says B is fastest, and counts what it timed."""

    def __init__(self, fail: tuple = ()) -> None:
        self.launched: list[Config] = []
        self.timed: list[Config] = []
        self.fail = fail

    def launch(self, cfg: Config) -> None:
        if cfg in self.fail:
            raise RuntimeError("out of resources")
        self.launched.append(cfg)

    def bench(self, fn) -> float:  # noqa: ANN001
        before = len(self.launched)
        fn()
        cfg = self.launched[before]
        self.timed.append(cfg)
        return {A: 2.0, B: 1.0, C: 3.0, D: 0.5}[cfg]


def _candidates(mode: str) -> list[Config]:
    return [A, B, C] if mode != "full" else [A, B, C, D]  # D, the fastest, only in the full search


@pytest.mark.parametrize("value, mode", [(None, "curated"), ("", "curated"), ("curated", "curated"),
                                         (" Reduced ", "reduced"), ("FULL", "full")])
def test_mode_parsing(monkeypatch, value: str | None, mode: str) -> None:
    if value is not None:
        monkeypatch.setenv(autotune.ENV_MODE, value)
    assert autotune_mode() == mode


def test_bad_mode_is_one_clear_error(monkeypatch) -> None:
    monkeypatch.setenv(autotune.ENV_MODE, "fast")
    msg = r"^LLM_DIST_AUTOTUNE='fast' is not one of curated \(the default\), reduced, full$"
    with pytest.raises(ValueError, match=msg):
        autotune_mode()


def test_lengths_in_one_bucket_share_a_key() -> None:
    assert [seq_bucket(n) for n in (1, 16, 17, 1000, 1024, 1025)] == [16, 16, 32, 1024, 1024, 2048]
    key = lambda n: tune_key("fwd", n, n, 64, True, False, 1, torch.bfloat16)  # noqa: E731
    assert key(1000) == key(1024) == key(513) != key(1025)
    assert key(1000) != tune_key("fwd", 1000, 1000, 64, True, False, 1, torch.float16)
    assert "bfloat16" in key(1000) and "q1024" in key(1000)


def test_tunes_once_per_bucket_and_persists_data_only_json() -> None:
    k = _Kernel()
    tuner = Tuner("fwd", bench=k.bench)
    key1000 = tune_key("fwd", 1000, 1000, 64, True, False, 1, torch.bfloat16)
    key1024 = tune_key("fwd", 1024, 1024, 64, True, False, 1, torch.bfloat16)
    assert tuner.run(key1000, _candidates, k.launch, GPU) == B
    assert k.timed == [A, B, C] and k.launched[-1] == B  # timed each, then ran the fastest
    k.timed.clear()
    assert tuner.run(key1024, _candidates, k.launch, GPU) == B  # same bucket: no timing
    assert k.timed == [] and tuner.tuned == 1

    path = cache_path(GPU)
    assert path.name == "NVIDIA_Test_GPU_80GB.json"
    doc = json.loads(path.read_text())
    assert doc == {"version": 1, "device": GPU, "entries": {key1000: {**B.to_json(), "mode": "curated"}}}

    def plain(x: object) -> bool:
        return isinstance(x, (str, int, float, bool, type(None))) or \
            (isinstance(x, list) and all(map(plain, x))) or \
            (isinstance(x, dict) and all(isinstance(k, str) and plain(v) for k, v in x.items()))
    assert plain(doc)

    fresh = _Kernel()  # a new process: reads the file, launches the cached choice without timing
    assert Tuner("fwd", bench=fresh.bench).run(key1024, _candidates, fresh.launch, GPU) == B
    assert fresh.timed == [] and fresh.launched == [B]


def test_corrupt_cache_is_ignored_with_one_line_warning() -> None:
    path = cache_path(GPU)
    path.parent.mkdir(parents=True)
    key = tune_key("dq", 100, 100, 128, True, False, 2, torch.bfloat16)
    bad_files = ["{not json", json.dumps({"version": 1, "entries": {key: {**A.to_json(), "BLOCK_M": "128",
                                                                          "mode": "curated"}}}),
                 json.dumps({"version": 1, "entries": {key: {**A.to_json(), "num_warps": 3, "mode": "full"}}}),
                 json.dumps([1, 2]), json.dumps({"version": 99, "entries": {}})]
    for text in bad_files:
        path.write_text(text)
        autotune._WARNED.clear()
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            assert load_cache(path) == {}
            assert load_cache(path) == {}  # once per file
        assert len(w) == 1 and "corrupt" in str(w[0].message) and "\n" not in str(w[0].message), text
    k = _Kernel()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert Tuner("dq", bench=k.bench).run(key, _candidates, k.launch, GPU) == B  # tuned, file rewritten
    assert load_cache(path)[key] == {"config": B, "mode": "curated"}


def test_full_mode_retunes_curated_choices_and_curated_accepts_full_ones() -> None:
    key = tune_key("dkdv", 4096, 4096, 128, True, False, 1, torch.bfloat16)
    k = _Kernel()
    Tuner("dkdv", bench=k.bench).run(key, _candidates, k.launch, GPU, mode="curated")
    k2 = _Kernel()
    assert Tuner("dkdv", bench=k2.bench).run(key, _candidates, k2.launch, GPU, mode="full") == D
    assert k2.timed == [A, B, C, D]  # the curated entry did not satisfy `full`: the whole space was timed
    assert load_cache(cache_path(GPU))[key] == {"config": D, "mode": "full"}
    k3 = _Kernel()
    assert Tuner("dkdv", bench=k3.bench).run(key, _candidates, k3.launch, GPU, mode="curated") == D
    assert k3.timed == []


def test_reduced_mode_takes_the_first_candidate_without_timing_or_cache() -> None:
    k = _Kernel()
    key = tune_key("fwd", 64, 64, 64, True, False, 1, torch.float16)
    assert Tuner("fwd", bench=k.bench).run(key, _candidates, k.launch, GPU, mode="reduced") == A
    assert k.timed == [] and k.launched == [A] and not cache_path(GPU).exists()
    k2 = _Kernel(fail=(A,))  # the first does not compile here (e.g. fp32 tiles): the next one, still untimed
    assert Tuner("fwd", bench=k2.bench).run(key, _candidates, k2.launch, GPU, mode="reduced") == B
    assert k2.timed == [] and k2.launched == [B]


def test_failing_candidates_are_skipped_and_a_stale_cached_choice_is_retuned() -> None:
    key = tune_key("fwd", 300, 300, 64, False, False, 1, torch.bfloat16)
    k = _Kernel(fail=(B,))
    assert Tuner("fwd", bench=k.bench).run(key, _candidates, k.launch, GPU) == A  # B does not compile here
    k2 = _Kernel(fail=(A,))  # e.g. a new Triton version: the cached A no longer runs
    with pytest.warns(RuntimeWarning, match="failed .* tuning again"):
        assert Tuner("fwd", bench=k2.bench).run(key, _candidates, k2.launch, GPU) == B
    with pytest.raises(RuntimeError, match="no configuration"):
        k3 = _Kernel(fail=(A, B, C))
        Tuner("fwd", bench=k3.bench).run(tune_key("fwd", 5, 5, 64, False, False, 1, "x"), _candidates, k3.launch, GPU)


def test_unwritable_cache_warns_once_and_keeps_the_choice(tmp_path: Path, monkeypatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(autotune.ENV_CACHE, str(blocker / "sub"))  # a directory under a file: cannot be created
    k = _Kernel()
    tuner = Tuner("fwd", bench=k.bench)
    with pytest.warns(RuntimeWarning, match="not writable"):
        assert tuner.run(tune_key("fwd", 64, 64, 64, True, False, 1, "bf16"), _candidates, k.launch, GPU) == B
    assert tuner.run(tune_key("fwd", 60, 60, 64, True, False, 1, "bf16"), _candidates, k.launch, GPU) == B


@needs_triton
def test_curated_sets_are_small_and_fit_hopper_and_ampere(monkeypatch) -> None:
    fa = importlib.import_module("llm_dist.kernels.flash_attention")  # the package's function has this name

    for (arch, kernel, d), configs in fa._CURATED.items():
        assert 1 <= len(configs) <= 4
        limit = 232448 if arch == "sm90" else 166912  # H100/H200 and A100 opt-in shared memory per block
        monkeypatch.setattr(fa, "_smem_limit", lambda limit=limit: limit)
        assert fa._prune(configs, d, 4096) == configs, (arch, kernel, d)  # none wasted on an impossible config
        assert fa._prune(configs, d, 16)  # short sequences keep at least one
        assert fa._prune(configs, d, 4096, elem_bytes=4)  # fp32 inputs: twice the bytes per tile
    monkeypatch.setattr(fa, "_smem_limit", lambda: 101376)  # a consumer card: falls back to a config that fits
    assert fa._prune(fa._CURATED[("sm90", "fwd", 128)], 128, 4096) == [fa._SAFE_CONFIG]
    monkeypatch.setattr(fa, "_smem_limit", lambda: 232448)
    assert fa._prune(fa._CURATED[("sm90", "fwd", 128)], 128, 4096, elem_bytes=4) == [fa._SAFE_CONFIG]


@needs_triton
@quiet_interpreter
def test_bad_mode_stops_the_attention_call(monkeypatch) -> None:
    from llm_dist.kernels.flash_attention import flash_attention_triton

    monkeypatch.setenv(autotune.ENV_MODE, "fastest")
    q = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="LLM_DIST_AUTOTUNE='fastest'"):
        flash_attention_triton(q, q, q)
