"""Architecture ablations: one short pretraining run per variant, one table and one plot of validation loss.

    python tools/ablate.py                                   # every variant of configs/ablations/variants.yaml
    python tools/ablate.py --only baseline,rope --steps 100  # a subset, shorter
    python tools/ablate.py --out runs/ablations/results.json --plot docs/ablations.png --table docs/ablations_table.md

Each variant is `configs/ablations/base.yaml` plus that variant's `key=value` overrides, run with the real
launcher (`launch/pretrain.py`) in a subprocess, so an ablation is exactly a normal training run: same
seed, same data order, same schedule; only the architecture differs. The validation curve is read back
from each run's `metrics.jsonl`. Runs whose directory already holds a finished metrics file are reused
unless `--force` is given, so an interrupted grid continues where it stopped.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from llm_dist.config.loading import safe_load_unique  # noqa: E402


def load_variants(path: Path) -> dict[str, list[str]]:
    """`name: [key=value, ...]` from a YAML mapping; raises SystemExit with one line on a bad file."""
    try:
        data = safe_load_unique(path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:  # a duplicate variant name would drop one silently
        raise SystemExit(f"error: {path}: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise SystemExit(f"error: {path}: expected a mapping of variant name -> list of key=value overrides")
    return {str(k): [str(o) for o in v] for k, v in data.items()}


def read_run(run_dir: Path) -> dict:
    """Validation curve and the last training loss of a finished run (empty curve if it has none)."""
    val, train = [], None
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            r = json.loads(line)
            if "val/loss" in r:
                val.append((r["step"], r["val/loss"]))
            elif "loss" in r:
                train = r["loss"]
    return {"val_curve": val, "final_train_loss": train}


def run_variant(name: str, overrides: list[str], base: Path, out_root: Path, extra: list[str],
                force: bool, threads: int) -> dict:
    """Train one variant (or reuse its finished run) and return its results."""
    run_dir = out_root / name
    info_file = run_dir / "ablation.json"
    if info_file.is_file() and not force:
        return json.loads(info_file.read_text())
    cmd = [sys.executable, str(REPO / "launch/pretrain.py"), "--config", str(base), *overrides, *extra,
           f"out_dir={run_dir}", "checkpoint.resume=never"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "CUDA_VISIBLE_DEVICES": ""}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"error: variant {name!r} failed (exit {p.returncode}):\n{p.stderr[-2000:]}")
    m = re.search(r"params \S+ \(([\d,]+)\)", p.stdout)
    res = {"name": name, "overrides": overrides, "params": int(m.group(1).replace(",", "")) if m else None,
           "seconds": round(seconds, 1), **read_run(run_dir)}
    if not res["val_curve"]:
        raise SystemExit(f"error: variant {name!r} logged no validation loss (eval.interval?)")
    info_file.write_text(json.dumps(res, indent=2))
    return res


def table(results: list[dict]) -> str:
    """Markdown table, best final validation loss first, with the difference to the baseline."""
    base = next((r for r in results if r["name"] == "baseline"), None)
    lines = ["| variant | overrides | params | final val loss | best val loss | Δ vs baseline | final train loss | time (s) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in sorted(results, key=lambda r: r["val_curve"][-1][1]):
        final = r["val_curve"][-1][1]
        best = min(v for _, v in r["val_curve"])
        delta = f"{final - base['val_curve'][-1][1]:+.3f}" if base else "-"
        ov = ", ".join(f"`{o}`" for o in r["overrides"]) or "(GPT-2 block)"
        train = f"{r['final_train_loss']:.3f}" if r["final_train_loss"] is not None else "-"
        params = f"{r['params']:,}" if r["params"] else "-"
        lines.append(f"| {r['name']} | {ov} | {params} | {final:.3f} | {best:.3f} | {delta} | {train} | {r['seconds']:.0f} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    """Validation loss curves of every variant in one PNG (needs matplotlib: `pip install -e .[plot]`)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    for r in sorted(results, key=lambda r: r["val_curve"][-1][1]):
        steps, losses = zip(*r["val_curve"])
        ax.plot(steps, losses, marker="o", markersize=3, label=f"{r['name']} ({losses[-1]:.3f})")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.set_title("Architecture ablations, Tiny Shakespeare (byte-level, 4x128)")
    ax.grid(alpha=0.3)
    ax.legend()
    lo = min(v for r in results for _, v in r["val_curve"])
    ax.set_ylim(lo - 0.05, min(3.5, max(v for r in results for _, v in r["val_curve"])))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Run the architecture ablation grid and tabulate/plot it.")
    ap.add_argument("--config", default=str(REPO / "configs/ablations/base.yaml"), help="shared base config")
    ap.add_argument("--variants", default=str(REPO / "configs/ablations/variants.yaml"), help="name -> overrides")
    ap.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    ap.add_argument("--steps", type=int, default=0, help="override train.max_steps (0 = the config's)")
    ap.add_argument("--runs", default=str(REPO / "runs/ablations"), help="directory for the runs")
    ap.add_argument("--out", default="", help="write all results as JSON here")
    ap.add_argument("--plot", default="", help="write the validation-loss plot (PNG) here")
    ap.add_argument("--table", default="", help="write the markdown table here")
    ap.add_argument("--threads", type=int, default=1, help="OMP threads per run")
    ap.add_argument("--force", action="store_true", help="re-run variants that already finished")
    ap.add_argument("overrides", nargs="*", help="extra key=value overrides for every variant")
    args = ap.parse_args(argv)

    variants = load_variants(Path(args.variants))
    names = [n for n in args.only.split(",") if n] or list(variants)
    unknown = [n for n in names if n not in variants]
    if unknown:
        print(f"error: --only: unknown variant(s) {', '.join(unknown)}; known: {', '.join(variants)}", file=sys.stderr)
        return 2
    extra = list(args.overrides) + ([f"train.max_steps={args.steps}"] if args.steps else [])
    results = []
    for name in names:
        print(f"== {name}: {' '.join(variants[name]) or '(baseline)'}", flush=True)
        r = run_variant(name, variants[name], Path(args.config), Path(args.runs), extra, args.force, args.threads)
        print(f"   final val loss {r['val_curve'][-1][1]:.4f} ({r['seconds']:.0f} s)", flush=True)
        results.append(r)
    md = table(results)
    print(md)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))
    if args.table:
        Path(args.table).write_text(md + "\n")
    if args.plot:
        plot(results, Path(args.plot))
    return 0


if __name__ == "__main__":
    sys.exit(main())
