"""Plot one or several runs' metrics.jsonl: loss (train and val), lr, grad norm, tokens/s, memory.

    python tools/plot_metrics.py runs/default                            # -> runs/default/metrics.png
    python tools/plot_metrics.py runs/a runs/b --labels AdamW,Lion --out runs/compare.png
    python tools/plot_metrics.py runs/default/metrics.jsonl --panels loss,val/bpb,mc/acc --smooth 20

Each argument is a run directory (its metrics.jsonl is read) or a JSONL file. Every run is one colour in
every panel; train loss is drawn solid, val loss dashed with markers in the same colour. Panels without
data in any run are left out. `--smooth N` draws a trailing N-point moving average of the train loss,
gradient norm and tokens/s (the raw values stay visible, faint). Needs matplotlib (`pip install -e ".[plot]"`).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# panel name -> (metric keys drawn in it, y-axis label, log scale)
PANELS: dict[str, tuple[tuple[str, ...], str, bool]] = {
    "loss": (("loss", "val/loss"), "loss (nats/token)", False),
    "lr": (("lr",), "learning rate", False),
    "grad_norm": (("grad_norm",), "gradient norm (before clipping)", True),
    "tok_per_s": (("tok_per_s",), "tokens/s", False),
    "mem_gib": (("mem_gib",), "memory (GiB)", False),
}
DEFAULT_PANELS = ("loss", "lr", "grad_norm", "tok_per_s", "mem_gib")
SMOOTHED = ("loss", "grad_norm", "tok_per_s")  # noisy step-to-step; lr and memory are drawn as logged


class MetricsFileError(ValueError):
    """A metrics file that cannot be read: names the file and line."""


def read_run(path: str | Path) -> list[dict]:
    """The records of a run directory's metrics.jsonl (or of a JSONL file); a torn last line is skipped."""
    p = Path(path)
    f = p / "metrics.jsonl" if p.is_dir() else p
    if not f.is_file():
        raise MetricsFileError(f"{path}: no metrics.jsonl there (expected a run directory or a JSONL file)")
    lines = f.read_text().splitlines()
    out = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):  # a run killed mid-write leaves a partial last line
                continue
            raise MetricsFileError(f"{f}:{n}: not valid JSON") from None
        if not isinstance(rec, dict) or "step" not in rec:
            raise MetricsFileError(f"{f}:{n}: expected a JSON object with a 'step'")
        out.append(rec)
    return out


def series(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in file order; a resumed run's repeated steps keep the latest value."""
    by_step: dict[int, float] = {}
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            by_step[int(r["step"])] = float(v)
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def moving_average(values: list[float], n: int) -> list[float]:
    """Trailing mean over up to n points (the first points average what there is)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= n:
            acc -= values[i - n]
        out.append(acc / min(i + 1, n))
    return out


def panel_spec(name: str) -> tuple[tuple[str, ...], str, bool]:
    """A named panel, or any metric key (e.g. val/bpb, mc/acc) as a panel of its own."""
    return PANELS.get(name, ((name,), name, False))


def plot(runs: list[tuple[str, list[dict]]], panels: list[str], out: str | Path, smooth: int = 0,
         title: str = "") -> dict[str, dict[str, tuple[list[int], list[float]]]]:
    """Draw the panels into one PNG; returns what was drawn: {panel: {"<run> <key>": (steps, values)}}."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    drawn: dict[str, dict[str, tuple[list[int], list[float]]]] = {}
    for name in panels:
        keys, _, _ = panel_spec(name)
        found = {f"{label} {k}": series(recs, k) for label, recs in runs for k in keys}
        found = {k: v for k, v in found.items() if v[0]}
        if found:
            drawn[name] = found
    if not drawn:
        raise MetricsFileError(f"none of the panels {', '.join(panels)} has data in the given runs")
    cols = min(len(drawn), 2 if len(drawn) <= 4 else 3)
    rows = -(-len(drawn) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.0 * cols, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, found) in zip(axes.flat, drawn.items()):
        keys, ylabel, log = panel_spec(name)
        for i, (label, _) in enumerate(runs):
            c = colours[i % len(colours)]
            for k in keys:
                if f"{label} {k}" not in found:
                    continue
                steps, values = found[f"{label} {k}"]
                is_val = "/" in k  # val/loss, val/bpb, mc/acc: evaluated every N steps
                tag = label if len(keys) == 1 else f"{label} {k}"
                if is_val:
                    ax.plot(steps, values, "--o", color=c, markersize=3, label=tag)
                elif smooth > 1 and k in SMOOTHED:
                    ax.plot(steps, values, color=c, alpha=0.25, linewidth=0.8)
                    ax.plot(steps, moving_average(values, smooth), color=c, label=tag)
                else:
                    ax.plot(steps, values, color=c, label=tag)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        if len(runs) > 1 or len(keys) > 1:
            ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(drawn):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return drawn


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", help="run directories or metrics JSONL files")
    ap.add_argument("--labels", default="", help="comma-separated run names (default: the directory names)")
    ap.add_argument("--panels", default=",".join(DEFAULT_PANELS),
                    help=f"comma-separated: {', '.join(PANELS)} or any metric key (val/bpb, mc/acc, ...)")
    ap.add_argument("--smooth", type=int, default=0, help="moving average over N points for train curves")
    ap.add_argument("--title", default="")
    ap.add_argument("--out", default="", help="PNG path (default: <first run>/metrics.png)")
    a = ap.parse_args(argv)
    labels = [x for x in a.labels.split(",") if x] or [Path(r).name if Path(r).is_dir() else Path(r).parent.name
                                                       for r in a.runs]
    if len(labels) != len(a.runs):
        print(f"error: --labels has {len(labels)} names for {len(a.runs)} runs", file=sys.stderr)
        return 2
    try:
        runs = [(label, read_run(r)) for label, r in zip(labels, a.runs)]
        first = Path(a.runs[0])
        out = a.out or str((first if first.is_dir() else first.parent) / "metrics.png")
        drawn = plot(runs, [x for x in a.panels.split(",") if x], out, a.smooth, a.title)
    except MetricsFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({', '.join(drawn)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
