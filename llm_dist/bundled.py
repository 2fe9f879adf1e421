"""Files shipped inside the package: the configs, GPT-2's BPE files and the Tiny Shakespeare corpus.

They live under `llm_dist/configs/` and `llm_dist/assets/` so that a wheel (non-editable `pip install .`)
carries them; a checkout also has `configs/`, `data/gpt2_bpe/` and `data/tinyshakespeare/` as symlinks to
the same files, which is why configs, docs and tests can keep naming those paths. Anywhere else (an
installed wheel, a run started from another directory) a checkout-style path that does not exist is looked
up here: `bundled_path("data/tinyshakespeare/input.txt")`, `config_file("debug")`.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

PACKAGE_DIR = Path(__file__).resolve().parent
ASSETS_DIR = PACKAGE_DIR / "assets"
CONFIGS_DIR = PACKAGE_DIR / "configs"

# Checkout-relative prefix -> its copy inside the package.
_BUNDLED = {
    "data/gpt2_bpe": ASSETS_DIR / "gpt2_bpe",
    "data/tinyshakespeare": ASSETS_DIR / "tinyshakespeare",
    "configs": CONFIGS_DIR,
}


def bundled_path(p: str) -> Path | None:
    """The shipped copy of a checkout-relative path such as `data/gpt2_bpe/gpt2.tiktoken`, or None when the
    path is not one of the shipped files."""
    parts = PurePosixPath(p.replace("\\", "/")).parts
    parts = parts[1:] if parts[:1] == (".",) else parts
    for prefix, target in _BUNDLED.items():
        n = len(PurePosixPath(prefix).parts)
        if parts[:n] == PurePosixPath(prefix).parts:
            candidate = target.joinpath(*parts[n:])
            return candidate if candidate.exists() else None
    return None


def shipped_configs() -> list[str]:
    """Names of the shipped configs, as `--config` accepts them (`debug`, `ablations/base`, ...)."""
    return sorted(str(p.relative_to(CONFIGS_DIR).with_suffix("")) for p in CONFIGS_DIR.rglob("*.yaml"))


def config_file(name: str) -> str:
    """A `--config` argument -> the file to read.

    An existing file wins (`my.yaml`, `configs/debug.yaml` in a checkout); otherwise a shipped config by
    name, with or without `configs/` and `.yaml`: `debug`, `debug.yaml`, `configs/debug.yaml`. Anything
    else is returned unchanged (the loader then says it is not found).
    """
    if Path(name).exists():
        return name
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.parts[:1] == ("configs",):
        rel = PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else rel
    if rel.suffix not in (".yaml", ".yml"):
        rel = rel.with_name(rel.name + ".yaml")
    candidate = CONFIGS_DIR / rel
    if not rel.is_absolute() and ".." not in rel.parts and candidate.is_file():
        return str(candidate)
    return name
