"""Build a small multiple-choice set (HellaSwag-style) from the held-out part of Tiny Shakespeare.

    python tools/make_mc_shakespeare.py                       # writes data/tinyshakespeare/mc_val.jsonl
    python tools/make_mc_shakespeare.py --n 200 --seed 1 --out /tmp/mc.jsonl

Only the validation part of the text is used: the characters after the 90% split point that data
preparation uses for a single text file (`char_split_point`, the default data.val_fraction=0.1), so a
model trained on the default split has never seen any of it.

Each example: a verse line of at least --min-chars characters is cut at a word boundary between 30%
and 60% of its length. The context is the preceding lines (up to --context-chars characters, whole
lines) plus the line's first part; the right ending is the rest of that line. The three wrong endings
are the second parts of other lines in the held-out text, at least 40 lines away, whose length is
within 25% of the right one's (so the summed log-likelihood cannot win on length alone). The right
ending's position is drawn at random. Everything comes from one `random.Random(seed)`: the same seed
gives the same file, byte for byte.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from llm_dist.data.prepare import char_split_point  # noqa: E402

N_ENDINGS = 4
MIN_DISTANCE = 40  # lines between an example and the lines its wrong endings come from


def held_out_lines(text: str, val_fraction: float) -> list[str]:
    """The validation part of the text as lines; the first (probably partial) line is dropped."""
    val = text[char_split_point(len(text), val_fraction):]
    return val.split("\n")[1:]


def split_line(line: str, rng: random.Random) -> tuple[str, str] | None:
    """(first part, rest starting with its space) cut at a word boundary in 30-60% of the line, or None."""
    spaces = [i for i, c in enumerate(line) if c == " " and 0.3 * len(line) <= i <= 0.6 * len(line)]
    if not spaces:
        return None
    cut = rng.choice(spaces)
    return line[:cut], line[cut:]


def build(lines: list[str], n: int, seed: int, min_chars: int, context_chars: int) -> list[dict]:
    rng = random.Random(seed)
    # Candidate lines: long verse lines (speaker names end with ':') with at least one line before them.
    cuts: dict[int, tuple[str, str]] = {}
    for i, line in enumerate(lines):
        if i >= 2 and len(line) >= min_chars and not line.rstrip().endswith(":"):
            parts = split_line(line, rng)
            if parts is not None:
                cuts[i] = parts
    chosen = sorted(rng.sample(sorted(cuts), min(n, len(cuts))))
    examples = []
    for i in chosen:
        first, right = cuts[i]
        ctx_lines: list[str] = []
        j = i - 1
        while j >= 0 and len("\n".join([lines[j], *ctx_lines])) <= context_chars:
            ctx_lines.insert(0, lines[j])
            j -= 1
        context = "\n".join(ctx_lines) + "\n" + first
        near = [k for k, (_, e) in cuts.items()
                if abs(k - i) >= MIN_DISTANCE and abs(len(e) - len(right)) <= 0.25 * len(right) and e != right]
        if len(near) < N_ENDINGS - 1:
            continue
        wrong = [cuts[k][1] for k in rng.sample(near, N_ENDINGS - 1)]
        label = rng.randrange(N_ENDINGS)
        endings = wrong[:label] + [right] + wrong[label:]
        examples.append({"context": context, "endings": endings, "label": label})
    return examples


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--input", default=str(REPO / "data/tinyshakespeare/input.txt"))
    ap.add_argument("--out", default=str(REPO / "data/tinyshakespeare/mc_val.jsonl"))
    ap.add_argument("--n", type=int, default=500, help="examples (fewer if the text has fewer candidate lines)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--val-fraction", type=float, default=0.1, help="must match data.val_fraction of the model")
    ap.add_argument("--min-chars", type=int, default=30, help="shortest line that becomes a question")
    ap.add_argument("--context-chars", type=int, default=300, help="at most this many characters of previous lines")
    a = ap.parse_args(argv)
    text = Path(a.input).read_text(encoding="utf-8")
    examples = build(held_out_lines(text, a.val_fraction), a.n, a.seed, a.min_chars, a.context_chars)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    with open(a.out, "w", encoding="utf-8") as f:
        for ex in examples:
            f.write(json.dumps(ex, ensure_ascii=False) + "\n")
    print(f"wrote {len(examples)} examples to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
