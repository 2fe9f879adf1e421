"""One GPU session's checks in one command (about 8 minutes on one H100/H200), or its learning comparison.

    PYTHONPATH=. python tools/gpu_check.py --nanogpt baselines/nanoGPT           # the speed check
    PYTHONPATH=. python tools/gpu_check.py --nanogpt baselines/nanoGPT --learning  # val loss vs nanoGPT (~10 min)
    PYTHONPATH=. python tools/gpu_check.py --dry-run                              # CPU: check every command line

Speed check, in order of importance (each step in its own process under a timeout, a shared time budget;
a step that does not fit in what is left is skipped with a note):
  kernels      `pytest tests/kernels` on the GPU with LLM_DIST_AUTOTUNE=reduced (a small autotune set)
  bench b{B} {compile|eager}
               tools/bench_train.py, GPT-2 124M, micro-batch B x 1024, bf16, model.bias=false (nanoGPT's
               model), B = 12 and 16, compiled and eager; and, with --nanogpt DIR, nanoGPT's bench.py at the
               same shape (`--real_data=False --compile=...`): tokens/s of each and ours / nanoGPT's
  bench_kernels tools/bench_kernels.py with one shape per section
  pretrain     the default `python launch/pretrain.py` (byte-level Tiny Shakespeare): val loss and tok/s
  bench_lora   tools/bench_lora.py on GPT-2 124M (8 x 1024, bf16, compiled): LoRA r=8/64 vs full fine-tuning
Learning check (--learning): configs/shakespeare_char_gpu.yaml against nanoGPT's `train.py
config/train_shakespeare_char.py` (the same recipe; its data prepared offline from our bundled Tiny
Shakespeare, tools/nanogpt_baseline.py): final val loss and wall time of each.

Outputs go to $OUT (default ./gpu_check_out): one log per step, gpu_check.json, and the table printed last.
Needs only torch, triton, numpy, pyyaml, psutil (the project's dependencies), no network. --dry-run checks,
on any machine, that each script exists and accepts its flags (`--help`, or parsing the config for
launch/pretrain.py) and that nanoGPT's files and configurator keys are there when --nanogpt is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(REPO / "tools"))

import nanogpt_baseline as nano  # noqa: E402

PY = sys.executable
SHAKESPEARE = REPO / "data/tinyshakespeare/input.txt"
BENCH_SHAPE = ["--config", "configs/gpt2_124m.yaml", "--seq", "1024", "--dtypes", "bf16", "model.bias=false"]


@dataclass
class Step:
    """One command of the check: what to run, where, for how long, and how to read its result."""

    name: str
    cmd: list[str]
    timeout: int  # seconds (the step's own cap; the remaining budget may cut it shorter)
    cwd: Path = REPO
    env: dict[str, str] = field(default_factory=dict)
    # stdout text, output dir -> the figures of this step (raises if they are not there)
    parse: Callable[[str, Path], dict[str, Any]] | None = None
    # dry run: a callable returning the problems with this command line ([] = fine)
    check: Callable[[], list[str]] | None = None
    skip: str = ""  # non-empty: not run, with this note
    prepare: Callable[[], None] | None = None  # before the command (e.g. nanoGPT's data)


# ----------------------------------------------------------------------------------------- checks

@functools.lru_cache(maxsize=None)
def help_text(script: Path) -> tuple[int, str]:
    """(exit code, stdout or last stderr line) of `script --help`, once per script."""
    p = subprocess.run([PY, str(script), "--help"], cwd=REPO, env=child_env({}), capture_output=True, text=True,
                       timeout=120)
    return p.returncode, p.stdout if p.returncode == 0 else (p.stderr.strip().splitlines() or [""])[-1]


def help_accepts(script: Path, flags: list[str]) -> list[str]:
    """Run `script --help` and return the --flags of our command line its help does not list."""
    if not script.is_file():
        return [f"{script} does not exist"]
    rc, text = help_text(script)
    if rc != 0:
        return [f"{script.name} --help exited {rc}: {text}"]
    return [f"{script.name} does not accept {f}" for f in flags if not re.search(rf"(?<![\w-]){re.escape(f)}\b", text)]


def flags_of(cmd: list[str]) -> list[str]:
    """The --flags (names only) on a command line."""
    return [a.split("=", 1)[0] for a in cmd if a.startswith("--")]


def config_parses(args: list[str]) -> Callable[[], list[str]]:
    """launch/pretrain.py's own parsing and validation of `--config ... key=value` (no --help mode needed)."""
    def check() -> list[str]:
        from llm_dist.config import ConfigError, parse_args
        try:
            parse_args(args).validate(1)
        except (ConfigError, OSError) as e:
            return [f"launch/pretrain.py {' '.join(args)}: {e}"]
        return []
    return check


# ----------------------------------------------------------------------------------------- parsing

def parse_bench_train(path: Path) -> Callable[[str, Path], dict[str, Any]]:
    """tools/bench_train.py's --out JSON -> {compile mode: {tok_per_s, step_ms, mfu}}."""
    def parse(_stdout: str, _out: Path) -> dict[str, Any]:
        rows = json.loads(path.read_text())["rows"]
        res = {}
        for r in rows:
            if "error" in r:
                res[r["compile"]] = {"error": r["error"]}
            else:
                res[r["compile"]] = {"tok_per_s": r["tok_per_s"], "step_ms": 1000 * r["step_time_median_s"],
                                     "mfu": r["mfu"], "peak_mem_gib": r["peak_mem_gib"]}
        return res
    return parse


def parse_run_dir(run_dir: Path) -> Callable[[str, Path], dict[str, Any]]:
    """A launch/pretrain.py run's metrics.jsonl -> last val loss, last logged tok/s and MFU, steps."""
    def parse(_stdout: str, _out: Path) -> dict[str, Any]:
        recs = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        val = [r for r in recs if "val/loss" in r]
        train = [r for r in recs if "tok_per_s" in r]
        if not val:
            raise ValueError(f"no val/loss in {run_dir / 'metrics.jsonl'}")
        return {"step": val[-1]["step"], "val_loss": val[-1]["val/loss"],
                "tok_per_s": train[-1]["tok_per_s"] if train else None, "mfu": train[-1].get("mfu") if train else None}
    return parse


# ----------------------------------------------------------------------------------------- the plan

def speed_plan(a: argparse.Namespace, out: Path) -> list[Step]:
    """The speed check's steps, most important first."""
    nano_dir = Path(a.nanogpt) if a.nanogpt else None
    nano_missing = nano.missing_files(nano_dir) if nano_dir else ["(no --nanogpt DIR)"]
    steps = [Step("kernels", [PY, "-m", "pytest", "-q", "-x", "tests/kernels"], 150,
                  env={"LLM_DIST_AUTOTUNE": "reduced"},
                  check=lambda: [] if (REPO / "tests/kernels").is_dir() else ["tests/kernels is missing"])]
    for compiled in (True, False):
        for batch in a.batches:
            tag = f"b{batch} {'compile' if compiled else 'eager'}"
            js = out / f"bench_train_b{batch}_{'compile' if compiled else 'eager'}.json"
            cmd = [PY, "tools/bench_train.py", *BENCH_SHAPE, "--batch", str(batch), "--compile",
                   "default" if compiled else "off", "--steps", str(a.bench_steps), "--warmup", "5", "--out", str(js)]
            steps.append(Step(f"ours {tag}", cmd, 150 if compiled else 60, parse=parse_bench_train(js),
                              check=lambda c=cmd: help_accepts(REPO / "tools/bench_train.py", flags_of(c))))
            ncmd = nano.bench_command(batch, compiled)
            steps.append(Step(
                f"nanoGPT {tag}", ncmd, 120 if compiled else 60, cwd=nano_dir or REPO,
                parse=lambda s, _o, b=batch: nano.parse_bench(s, b),
                check=lambda: nano.unknown_keys(nano_dir / "bench.py", nano.BENCH_KEYS) if nano_dir else [],
                skip="" if not nano_missing else f"nanoGPT not there: {', '.join(nano_missing)}"))
    bk = [PY, "tools/bench_kernels.py", "--seq", "2048", "--norm-dims", "4096", "--repeats", "5",
          "--out", str(out / "bench_kernels.json")]

    def kernel_rows(_stdout: str, _out: Path) -> dict[str, Any]:
        sections = json.loads((out / "bench_kernels.json").read_text())
        return {f"{k} rows": len(v) for k, v in sections.items() if k != "meta"}

    steps.append(Step("bench_kernels", bk, 150, parse=kernel_rows,
                      check=lambda: help_accepts(REPO / "tools/bench_kernels.py", flags_of(bk))))
    run_dir = out / "pretrain_default"
    pargs = [f"out_dir={run_dir}", "checkpoint.resume=never"]
    steps.append(Step("pretrain default", [PY, "launch/pretrain.py", *pargs], 240, parse=parse_run_dir(run_dir),
                      check=config_parses(pargs)))
    bl = [PY, "tools/bench_lora.py", "--ranks", "8,64", "--batch", "8", "--seq", "1024", "--dtype", "bf16",
          "--compile", "--steps", "10", "--warmup", "3", "--out", str(out / "bench_lora.json"),
          "model.n_layer=12", "model.n_embd=768", "model.n_head=12", "model.vocab_size=50304"]  # GPT-2 124M

    def lora_rows(_stdout: str, _out: Path) -> dict[str, Any]:
        rows = json.loads((out / "bench_lora.json").read_text())["rows"]
        return {r["variant"]: f"{r['step_time_median_s'] * 1e3:.0f} ms, {r['peak_mem_gib']:.1f} GiB, optim "
                              f"{r['optim_state_bytes'] / rows[0]['optim_state_bytes']:.4f}x" for r in rows}

    steps.append(Step("bench_lora", bl, 240, parse=lora_rows,
                      check=lambda: help_accepts(REPO / "tools/bench_lora.py", flags_of(bl))))
    return steps


def learning_plan(a: argparse.Namespace, out: Path) -> list[Step]:
    """Ours vs nanoGPT on the same character-level recipe: final val loss and wall time."""
    run_dir = out / "learning_ours"
    pargs = ["--config", "configs/shakespeare_char_gpu.yaml", f"out_dir={run_dir}", "checkpoint.resume=never"]
    steps = [Step("learning ours", [PY, "launch/pretrain.py", *pargs], a.learning_timeout,
                  parse=parse_run_dir(run_dir), check=config_parses(pargs))]
    nano_dir = Path(a.nanogpt) if a.nanogpt else None
    missing = nano.missing_files(nano_dir) if nano_dir else ["(no --nanogpt DIR)"]
    work = out / "learning_nanogpt"
    cmd = nano.train_command(nano_dir or Path("nanoGPT"), work / "out")
    steps.append(Step(
        "learning nanoGPT", cmd, a.learning_timeout, cwd=work, parse=lambda s, _o: nano.parse_train(s),
        prepare=lambda: nano.train_workdir(nano_dir, SHAKESPEARE, work),
        check=lambda: nano.unknown_keys(nano_dir / "train.py", nano.TRAIN_KEYS) if nano_dir else [],
        skip="" if not missing else f"nanoGPT not there: {', '.join(missing)}"))
    return steps


# ----------------------------------------------------------------------------------------- running

def child_env(extra: dict[str, str]) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])])
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_step(step: Step, out: Path, budget_left: float, shared_env: dict[str, str], min_seconds: int = 20
             ) -> dict[str, Any]:
    """Run one step under min(its timeout, the budget left); its output goes to $OUT/<name>.log.

    A step that would get less than `min_seconds` is skipped rather than started and killed.
    """
    rec: dict[str, Any] = {"name": step.name, "cmd": " ".join(step.cmd), "cwd": str(step.cwd)}
    if step.skip:
        return {**rec, "status": "skipped", "note": step.skip}
    limit = int(min(step.timeout, budget_left))
    if limit < min_seconds:
        return {**rec, "status": "skipped", "note": f"out of time budget ({budget_left:.0f} s left)"}
    log = out / (re.sub(r"[^\w.-]+", "_", step.name) + ".log")
    t0 = time.perf_counter()
    try:
        if step.prepare is not None:
            step.prepare()
        with open(log, "w") as f:
            # Own session: on timeout the whole process group goes (compile workers, torchrun ranks).
            p = subprocess.Popen(step.cmd, cwd=step.cwd, env=child_env({**shared_env, **step.env}), stdout=f,
                                 stderr=subprocess.STDOUT, start_new_session=True)
            try:
                rc = p.wait(timeout=limit)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                rc = None
    except OSError as e:
        return {**rec, "status": "failed", "seconds": time.perf_counter() - t0, "note": f"{type(e).__name__}: {e}"}
    rec["seconds"] = time.perf_counter() - t0
    rec["log"] = str(log)
    text = log.read_text(errors="replace")
    if rc is None:
        return {**rec, "status": "timeout", "note": f"killed after {limit} s"}
    if rc != 0:
        tail = (text.strip().splitlines() or ["(no output)"])[-1]
        return {**rec, "status": "failed", "note": f"exit {rc}: {tail[:200]}"}
    try:
        rec["result"] = step.parse(text, out) if step.parse else {}
    except (ValueError, KeyError, OSError, json.JSONDecodeError) as e:
        return {**rec, "status": "failed", "note": f"output not understood: {e}"}
    return {**rec, "status": "ok"}


def comparisons(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ours / nanoGPT tokens/s for each bench shape both ran; val loss and wall time for --learning."""
    by = {r["name"]: r for r in records if r["status"] == "ok"}
    rows = []
    for name, r in by.items():
        if name.startswith("ours b"):
            tag = name[len("ours "):]
            mode = "off" if tag.endswith("eager") else "default"
            ours = r["result"].get(mode, {})
            theirs = by.get(f"nanoGPT {tag}", {}).get("result", {})
            if "tok_per_s" in ours:
                rows.append({"what": f"tok/s {tag}", "ours": ours["tok_per_s"], "nanoGPT": theirs.get("tok_per_s"),
                             "ratio": ours["tok_per_s"] / theirs["tok_per_s"] if theirs else None})
    if "learning ours" in by:
        o, n = by["learning ours"], by.get("learning nanoGPT")
        rows.append({"what": "val loss", "ours": o["result"]["val_loss"],
                     "nanoGPT": n["result"]["val_loss"] if n else None, "ratio": None})
        rows.append({"what": "wall s", "ours": o["seconds"], "nanoGPT": n["seconds"] if n else None,
                     "ratio": o["seconds"] / n["seconds"] if n else None})
    return rows


def summary(r: dict[str, Any]) -> str:
    """One line of a step's result for the table."""
    if r["status"] != "ok":
        return r.get("note", "")
    res = r["result"]
    if r["name"].startswith("ours b"):
        return "; ".join(f"{k}: " + (v["error"][:60] if "error" in v else
                                     f"{v['tok_per_s']:,.0f} tok/s, {v['step_ms']:.1f} ms"
                                     + (f", MFU {100 * v['mfu']:.1f}%" if v.get("mfu") else ""))
                         for k, v in res.items())
    if "step_ms" in res:
        return f"{res['tok_per_s']:,.0f} tok/s, {res['step_ms']:.1f} ms"
    if "val_loss" in res:
        extra = f", {res['tok_per_s']:,.0f} tok/s" if res.get("tok_per_s") else ""
        return f"val loss {res['val_loss']:.4f} at step {res['step']}{extra}"
    return ", ".join(f"{k} {v}" for k, v in res.items())


def table(records: list[dict[str, Any]], comps: list[dict[str, Any]]) -> str:
    lines = ["| step | status | s | result |", "|---|---|---:|---|"]
    for r in records:
        secs = f"{r['seconds']:.0f}" if "seconds" in r else ""
        lines.append(f"| {r['name']} | {r['status']} | {secs} | {summary(r)} |")
    if comps:
        lines += ["", "| ours vs nanoGPT | ours | nanoGPT | ours / nanoGPT |", "|---|---:|---:|---:|"]
        for c in comps:
            f = (lambda v: "–" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.4f}"))
            lines.append(f"| {c['what']} | {f(c['ours'])} | {f(c['nanoGPT'])} | "
                         f"{'–' if c['ratio'] is None else format(c['ratio'], '.2f') + 'x'} |")
    return "\n".join(lines)


def dry_run(steps: list[Step]) -> int:
    """Check every step's command line without running it; 0 when all are runnable (or knowingly skipped)."""
    problems = 0
    for s in steps:
        issues = list(s.check()) if s.check and not s.skip else []
        script = next((Path(s.cwd, c) for c in s.cmd[1:] if c.endswith(".py")), None)
        if script is not None and not s.skip and not script.is_file():
            issues.append(f"{script} does not exist")
        status = "skip: " + s.skip if s.skip else ("ok" if not issues else "; ".join(issues))
        problems += bool(issues)
        print(f"  {s.name:22s} {status}\n      (cd {s.cwd} && {' '.join(s.cmd)})", flush=True)
    print(f"dry run: {len(steps)} steps, {problems} with problems")
    return 1 if problems else 0


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nanogpt", default="", help="a copy of karpathy/nanoGPT (e.g. baselines/nanoGPT); "
                                                 "its rows are skipped with a note when absent")
    p.add_argument("--learning", action="store_true", help="run the learning comparison instead of the speed check")
    p.add_argument("--budget", type=int, default=480, help="seconds for the whole speed check (8 minutes)")
    p.add_argument("--learning-timeout", type=int, default=900, help="seconds per learning run")
    p.add_argument("--batches", default="12,16", help="micro-batches of the bench rows")
    p.add_argument("--bench-steps", type=int, default=20, help="timed steps of each bench_train row")
    p.add_argument("--dry-run", action="store_true", help="check every command line, run nothing (any machine)")
    a = p.parse_args(argv)
    a.batches = [int(b) for b in a.batches.split(",") if b]
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse(argv)
    out = Path(os.environ.get("OUT", "gpu_check_out")).resolve()
    if a.dry_run:
        with tempfile.TemporaryDirectory() as tmp:
            steps = speed_plan(a, Path(tmp)) + learning_plan(a, Path(tmp))
            rc = dry_run(steps)
            if a.nanogpt and not nano.missing_files(Path(a.nanogpt)):  # the offline data preparation, for real
                info = nano.prepare_shakespeare_char(SHAKESPEARE, Path(tmp) / "data")
                print(f"  nanoGPT shakespeare_char data: {info}")
        return rc
    import torch
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU here; --dry-run checks the command lines on any machine", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    # One inductor/Triton cache for every step: a rerun of the check compiles nothing twice.
    shared = {"TORCHINDUCTOR_CACHE_DIR": str(out / "inductor_cache"), "TRITON_CACHE_DIR": str(out / "triton_cache")}
    steps = learning_plan(a, out) if a.learning else speed_plan(a, out)
    budget = a.learning_timeout * len(steps) if a.learning else a.budget
    t0 = time.perf_counter()
    records = []
    for s in steps:
        r = run_step(s, out, budget - (time.perf_counter() - t0), shared)
        records.append(r)
        print(f"[{time.perf_counter() - t0:5.0f} s] {r['name']}: {r['status']}  {summary(r)}", flush=True)
    comps = comparisons(records)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "date": time.strftime("%Y-%m-%d %H:%M:%S"), "total_s": time.perf_counter() - t0, "args": vars(a)}
    (out / "gpu_check.json").write_text(json.dumps({"meta": meta, "steps": records, "comparisons": comps}, indent=1,
                                                   default=str))
    print(f"\n{meta['device']}, torch {meta['torch']}, {meta['total_s']:.0f} s; logs and gpu_check.json in {out}\n")
    print(table(records, comps))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    raise SystemExit(main())
