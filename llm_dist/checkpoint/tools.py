"""Offline checkpoint tools: inspect a checkpoint, consolidate its weights into safetensors, convert formats.

The library behind `tools/checkpoint.py`. Three formats:

- ``dcp``: a run checkpoint directory (`step_N/`, see `manager.py`): sharded model + optimizer, any world
  size. Read here only through the strict metadata reader (JSON index, or a legacy pickle through the
  restricted unpickler) and the `weights_only` planner (`sharded.py`).
- ``safetensors``: one unsharded file of the model weights (no optimizer), self-describing: its metadata
  holds the resolved run config (JSON), the tokenizer record, the source step and the weight ties.
- ``pt``: a plain torch `state_dict` (`model.load_state_dict(torch.load(f, weights_only=True))` works);
  it carries no config, so converting it to safetensors needs `config=` from a checkpoint, a safetensors
  file or a YAML config.

Tied weights: with `model.tie_embeddings`, `lm_head.weight` *is* `tok_emb.weight`. safetensors refuses
tensors that share storage, so the file stores `tok_emb.weight` once and records
``{"lm_head.weight": "tok_emb.weight"}`` under the metadata key ``tied``; `load_safetensors` puts the alias
back. A `.pt` file keeps both keys on one shared tensor (torch.save preserves sharing).

Nothing here unpickles untrusted data: DCP metadata through `SafeReader`, values through `weights_only`,
safetensors by construction, `.pt` files with `torch.load(weights_only=True)`. DCP → DCP is deliberately
not offered: a resumable checkpoint needs optimizer, loader and RNG state that weights alone do not have.
"""

from __future__ import annotations

import fnmatch
import json
import os
import posixpath
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import fsspec
import torch
import yaml

from llm_dist.checkpoint import sharded
from llm_dist.config.loading import safe_load_unique
from llm_dist.checkpoint.manager import (COMPLETE, read_config_dict, read_json, resolve_checkpoint,
                                          tokenizer_record_name, verify)

FORMATS = ("dcp", "safetensors", "pt")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FORMAT_VERSION = "1"  # metadata key `llm_dist_format`: bump when the safetensors metadata layout changes
_EXPECTED = "expected a checkpoint dir (step_N), a run dir or its checkpoints/ dir"


class CheckpointToolError(ValueError):
    """Bad input: the message is one line naming the file and what was expected."""


@dataclass
class TensorInfo:
    """One entry of a DCP checkpoint: a tensor (global shape, all shards together) or a pickled-free value."""

    name: str  # flattened key: model.<param>, optim.state.<param>.<slot>, optim.param_groups.<i>.<key>
    group: str  # model | optim | other
    shape: list[int]
    dtype: str  # e.g. float32; "bytes" for non-tensor values (optimizer hyper-parameters)
    nbytes: int  # numel * element size for tensors; serialised length for bytes entries
    shards: int  # chunks the tensor is stored in (1 unless written sharded, e.g. by FSDP ranks)


# ---------------------------------------------------------------------------------------------------- paths


def _fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(str(url))
    return fs, path.rstrip("/")


def _join(url: str, *parts: str) -> str:
    return posixpath.join(str(url).rstrip("/"), *parts)


def _is_checkpoint_dir(url: str) -> bool:
    fs, root = _fs(url)
    return any(fs.exists(posixpath.join(root, n)) for n in ("meta.json", "dcp", COMPLETE))


def resolve(path: str) -> str:
    """A checkpoint dir as given (even if incomplete: inspect reports it), else the newest complete one under
    a run dir or a checkpoints dir."""
    fs, root = _fs(path)
    if not fs.exists(root):
        raise CheckpointToolError(f"{path}: no such file or directory ({_EXPECTED})")
    if _is_checkpoint_dir(path):
        return str(path).rstrip("/")
    latest = resolve_checkpoint(str(path))
    if latest is None:
        raise CheckpointToolError(f"{path}: no complete checkpoint there ({_EXPECTED})")
    return latest


def detect_format(path: str) -> str:
    """dcp for a directory, else by extension: .safetensors, .pt/.pth/.bin."""
    fs, root = _fs(path)
    if fs.isdir(root):
        return "dcp"
    ext = Path(root).suffix.lower()
    if ext == ".safetensors":
        return "safetensors"
    if ext in (".pt", ".pth", ".bin"):
        return "pt"
    if not fs.exists(root):
        raise CheckpointToolError(f"{path}: no such file or directory ({_EXPECTED}, a .safetensors or a .pt file)")
    raise CheckpointToolError(f"{path}: unknown format (expected a checkpoint dir, a .safetensors or a .pt file)")


# ---------------------------------------------------------------------------------------------- DCP reading


def read_dcp_metadata(url: str) -> Any:
    """The DCP index of checkpoint `url`: `.metadata.json` decoded strictly, or a legacy pickled `.metadata`
    through the restricted unpickler (never plain pickle). Refused metadata raises `UnsafeCheckpointError`."""
    dcp_dir = _join(url, "dcp")
    fs, _ = _fs(dcp_dir)
    if not any(fs.exists(_fs(_join(dcp_dir, n))[1]) for n in (sharded.METADATA_JSON, sharded.LEGACY_METADATA)):
        raise CheckpointToolError(f"{_join(dcp_dir, sharded.METADATA_JSON)}: missing (expected DCP metadata "
                                  "written by the checkpoint manager)")
    try:
        return sharded.SafeReader(dcp_dir).read_metadata()
    except sharded.CheckpointReadError:
        raise  # already one line naming the file; an unsafe one must stay UnsafeCheckpointError
    except Exception as e:  # noqa: BLE001 - an unreadable file raises many types; all mean "unreadable"
        raise CheckpointToolError(f"{dcp_dir}: unreadable DCP metadata ({type(e).__name__}: "
                                  f"{' '.join(str(e).split())[:200]})") from None


def tensor_table(metadata: Any) -> list[TensorInfo]:
    """Every entry of the DCP metadata, in stored order, with global shapes and sizes."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    byte_len: dict[str, int] = {}
    for idx, info in metadata.storage_data.items():  # bytes entries have no shape: use the stored length
        byte_len[idx.fqn] = byte_len.get(idx.fqn, 0) + int(info.length)
    rows = []
    for name, md in metadata.state_dict_metadata.items():
        group = name.split(".", 1)[0] if name.startswith(("model.", "optim.")) else "other"
        if isinstance(md, TensorStorageMetadata):
            dtype = md.properties.dtype
            numel = 1
            for s in md.size:
                numel *= int(s)
            rows.append(TensorInfo(name, group, [int(s) for s in md.size], str(dtype).removeprefix("torch."),
                                   numel * dtype.itemsize, len(md.chunks)))
        else:
            rows.append(TensorInfo(name, group, [], "bytes", byte_len.get(name, 0), 1))
    return rows


def read_model_tensors(url: str) -> dict[str, torch.Tensor]:
    """The model's tensors of checkpoint `url`, unsharded, on CPU, keyed by parameter name (no optimizer).

    Built from the metadata alone (no model class needed): an empty template of the right shapes and dtypes
    is filled by a partial DCP load, so memory is one copy of the weights whatever the writer's sharding.
    """
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(url)
    template = {name.removeprefix("model."): torch.empty(tuple(md.size), dtype=md.properties.dtype)
                for name, md in metadata.state_dict_metadata.items()
                if name.startswith("model.") and isinstance(md, TensorStorageMetadata)}
    if not template:
        raise CheckpointToolError(f"{_join(url, 'dcp')}: no model tensors (expected keys model.*)")
    state = {"model": template}
    sharded.load(state, _join(url, "dcp"), partial=True)
    return state["model"]


def read_run_config(url: str) -> dict:
    """The resolved run config of a checkpoint (config.yaml), as a plain dict."""
    fs, root = _fs(url)
    path = posixpath.join(root, "config.yaml")
    if not fs.exists(path):
        raise CheckpointToolError(f"{_join(url, 'config.yaml')}: missing (expected the run's resolved config)")
    try:
        cfg = read_config_dict(url)  # the same safe parse as resume/generate; damage is one line
    except sharded.CheckpointReadError as e:
        raise CheckpointToolError(str(e)) from None
    if not isinstance(cfg.get("model"), dict):
        raise CheckpointToolError(f"{_join(url, 'config.yaml')}: not a run config (expected a mapping with 'model')")
    return cfg


def _read_json_or_none(url: str, name: str) -> dict | None:
    fs, root = _fs(url)
    if not fs.exists(posixpath.join(root, name)):
        return None
    try:
        return read_json(url, name)
    except (ValueError, UnicodeDecodeError):
        return None  # a damaged file: `verify` names it


# --------------------------------------------------------------------------------------------------- inspect


def model_summary(cfg: dict) -> dict:
    """The architecture keys a reader wants first, from a run config dict."""
    m = cfg.get("model", {})
    keys = ("n_layer", "n_head", "n_kv_head", "n_embd", "vocab_size", "block_size", "mlp", "norm", "pos_emb",
            "tie_embeddings", "bias")
    out = {k: m[k] for k in keys if k in m}
    moe = m.get("moe") or {}
    if moe.get("num_experts"):
        out["moe"] = f"{moe['num_experts']} experts, top {moe.get('top_k')}"
    return out


def _tied_keys(cfg: dict | None, names: set[str]) -> dict[str, str]:
    """{alias: stored} for the ties the model config declares and the tensors present."""
    if cfg and cfg.get("model", {}).get("tie_embeddings") and {"lm_head.weight", "tok_emb.weight"} <= names:
        return {"lm_head.weight": "tok_emb.weight"}
    return {}


def inspect(path: str) -> dict:
    """Everything about a checkpoint dir (or the newest under a run dir), or a safetensors file, as a dict."""
    if detect_format(path) == "safetensors":
        return inspect_safetensors(path)
    url = resolve(path)
    meta = _read_json_or_none(url, "meta.json") or {}
    fs, root = _fs(url)
    try:
        cfg = read_run_config(url)
    except CheckpointToolError:
        cfg = None
    rows = tensor_table(read_dcp_metadata(url))
    by_group = {g: sum(r.nbytes for r in rows if r.group == g) for g in ("model", "optim", "other")}
    model_rows = {r.name.removeprefix("model."): r for r in rows if r.group == "model" and r.dtype != "bytes"}
    ties = _tied_keys(cfg, set(model_rows))
    n_params = sum(_numel(r.shape) for k, r in model_rows.items() if k not in ties)
    problem = verify(url, checksums=True)  # inspect is where a user checks a checkpoint: every byte
    return {
        "format": "dcp", "path": url, "step": meta.get("step"), "world_size": meta.get("world_size"),
        "strategy": meta.get("strategy"), "tokens_seen": meta.get("tokens_seen"), "time": meta.get("time"),
        "complete": fs.exists(posixpath.join(root, COMPLETE)), "verify": problem or "ok",
        "model": model_summary(cfg) if cfg else None, "tokenizer": _read_json_or_none(url, tokenizer_record_name(url)),
        "tied": ties, "tensors": [asdict(r) for r in rows],
        "totals": {"model_bytes": by_group["model"], "optim_bytes": by_group["optim"],
                   "other_bytes": by_group["other"], "model_params": n_params, "entries": len(rows),
                   "files_bytes": sum(meta.get("files", {}).values())},
    }


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def inspect_safetensors(path: str) -> dict:
    """Header of a safetensors file: its llm_dist metadata and tensor table, without reading the data."""
    meta, infos = _safetensors_header(path)
    cfg = json.loads(meta["config"]) if "config" in meta else None
    ties = json.loads(meta.get("tied", "{}"))
    return {
        "format": "safetensors", "path": path, "step": _int_or_none(meta.get("step")), "world_size": None,
        "strategy": None, "tokens_seen": _int_or_none(meta.get("tokens_seen")), "time": None, "complete": True,
        "verify": "ok", "model": model_summary(cfg) if cfg else None,
        "tokenizer": json.loads(meta["tokenizer"]) if "tokenizer" in meta else None, "tied": ties,
        "tensors": [asdict(r) for r in infos],
        "totals": {"model_bytes": sum(r.nbytes for r in infos), "optim_bytes": 0, "other_bytes": 0,
                   "model_params": sum(_numel(r.shape) for r in infos), "entries": len(infos),
                   "files_bytes": os.path.getsize(path)},
    }


def _int_or_none(v: str | None) -> int | None:
    return int(v) if v not in (None, "") else None


def _human_bytes(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def format_inspect(info: dict, pattern: str = "*") -> str:
    """Human-readable report: header lines, then the tensor table (names matching `pattern`), then totals."""
    t = info["totals"]
    lines = [f"{info['format']} {info['path']}"]
    if info["format"] == "dcp":
        seen = "?" if info["tokens_seen"] is None else f"{info['tokens_seen']:,}"
        lines.append(f"  step {info['step']} | written by {info['world_size']} rank(s), strategy {info['strategy']} | "
                     f"tokens seen {seen}")
        complete = "yes" if info["complete"] else "NO (no COMPLETE marker)"
        lines.append(f"  complete: {complete} | verify: {info['verify']}")
    else:
        lines.append(f"  step {info['step']} | tokens seen {info['tokens_seen']}")
    if info["model"]:
        lines.append("  model: " + ", ".join(f"{k}={v}" for k, v in info["model"].items()))
    if info["tokenizer"]:
        tok = info["tokenizer"]
        lines.append(f"  tokenizer: {tok.get('spec', tok.get('name'))} (vocab {tok.get('vocab_size')}, "
                     f"fingerprint {tok.get('fingerprint')})")
    if info["tied"]:
        lines.append("  tied: " + ", ".join(f"{a} = {b}" for a, b in info["tied"].items()))
    rows = [r for r in info["tensors"] if fnmatch.fnmatchcase(r["name"], pattern)]
    w = max([len("name")] + [len(r["name"]) for r in rows])
    lines += ["", f"  {'name':<{w}}  {'shape':<18} {'dtype':<9} {'size':>10}  shards"]
    for r in rows:
        shape = "x".join(map(str, r["shape"])) if r["dtype"] != "bytes" else "-"
        lines.append(f"  {r['name']:<{w}}  {shape or 'scalar':<18} {r['dtype']:<9} {_human_bytes(r['nbytes']):>10}  "
                     f"{r['shards']}")
    if len(rows) < len(info["tensors"]):
        lines.append(f"  ({len(info['tensors']) - len(rows)} more entries not matching {pattern!r})")
    lines += ["", f"  model {_human_bytes(t['model_bytes'])} ({t['model_params']:,} parameters"
                  f"{', tied counted once' if info['tied'] else ''}) | optimizer {_human_bytes(t['optim_bytes'])} | "
                  f"other {_human_bytes(t['other_bytes'])} | {t['entries']} entries | "
                  f"on disk {_human_bytes(t['files_bytes'])}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------- safetensors


def _safetensors_header(path: str) -> tuple[dict[str, str], list[TensorInfo]]:
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            infos = []
            for k in f.keys():
                sl = f.get_slice(k)
                dtype = _ST_DTYPES.get(sl.get_dtype(), sl.get_dtype().lower())
                shape = list(sl.get_shape())
                infos.append(TensorInfo(k, "model", shape, dtype, _numel(shape) * _itemsize(dtype), 1))
    except FileNotFoundError:
        raise CheckpointToolError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for a bad header
        raise CheckpointToolError(f"{path}: not a safetensors file ({' '.join(str(e).split())[:200]})") from None
    return meta, infos


_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64",
              "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _itemsize(dtype: str) -> int:
    return getattr(torch, dtype).itemsize if hasattr(torch, dtype) else 1


def save_safetensors(tensors: dict[str, torch.Tensor], out: str, config: dict, extra: dict[str, Any] | None = None,
                     dtype: torch.dtype | None = None) -> dict:
    """Write model weights + config to one safetensors file (atomically: temp file, then rename).

    Tied aliases are dropped and recorded under `tied` (after checking they really are equal); floating
    tensors are cast to `dtype` if given. Returns a summary {path, tensors, bytes, tied}.
    """
    from safetensors.torch import save_file

    check_against_config(tensors, config, out)
    ties = _tied_keys(config, set(tensors))
    for alias, stored in ties.items():
        if not torch.equal(tensors[alias], tensors[stored]):
            raise CheckpointToolError(f"config says {alias} is tied to {stored}, but the stored tensors differ")
    out_t = {}
    for k, v in tensors.items():
        if k in ties:
            continue
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        out_t[k] = v.detach().to("cpu").contiguous()
    meta = {"format": "pt", "llm_dist_format": FORMAT_VERSION, "config": json.dumps(config),
            "tied": json.dumps(ties)}
    for k, v in (extra or {}).items():
        if v is not None:
            meta[k] = v if isinstance(v, str) else json.dumps(v)
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=out_path.name + ".", suffix=".tmp")
    os.close(fd)
    try:  # a crash mid-write leaves a stray *.tmp, never a truncated file under the final name
        save_file(out_t, tmp, metadata=meta)
        os.replace(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return {"path": str(out_path), "tensors": len(out_t), "bytes": out_path.stat().st_size, "tied": ties}


def check_against_config(tensors: dict[str, torch.Tensor], config: dict, what: str) -> None:
    """The tensors must be exactly the state dict of the model the config describes (names and shapes).

    Built on the meta device (no memory), so a wrong `--config` (e.g. an unresolved YAML whose vocab_size
    is still 0) is caught before a file is written that `build_from_safetensors` could not load.
    """
    from llm_dist.config import Config, apply_dict
    from llm_dist.model.transformer import Transformer

    cfg = Config()
    apply_dict(cfg, config)
    if cfg.model.vocab_size <= 0:
        raise CheckpointToolError(f"{what}: config has model.vocab_size={cfg.model.vocab_size} (expected the "
                                  "run's resolved config, e.g. <out_dir>/config.yaml)")
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Transformer(cfg.model).state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointToolError(f"{what}: weights do not match the config's model (missing {missing[:3]}, "
                                  f"unexpected {extra[:3]})")
    for k, shape in expected.items():
        if tuple(tensors[k].shape) != shape:
            raise CheckpointToolError(f"{what}: {k} has shape {list(tensors[k].shape)}, the config's model "
                                      f"expects {list(shape)}")


def load_safetensors(path: str) -> tuple[dict[str, torch.Tensor], dict | None, dict[str, str]]:
    """(state dict with tied aliases restored as the same tensor, run config dict or None, raw metadata)."""
    from safetensors.torch import load_file

    meta, _ = _safetensors_header(path)  # one-line errors for a missing or malformed file
    try:
        tensors = load_file(path)
    except Exception as e:  # noqa: BLE001 - truncated data past a valid header
        raise CheckpointToolError(f"{path}: unreadable safetensors data ({' '.join(str(e).split())[:200]})") from None
    for alias, stored in json.loads(meta.get("tied", "{}")).items():
        if stored not in tensors:
            raise CheckpointToolError(f"{path}: tie {alias} -> {stored} names a tensor that is not in the file")
        tensors[alias] = tensors[stored]
    config = json.loads(meta["config"]) if "config" in meta else None
    return tensors, config, meta


def build_from_safetensors(path: str, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, Any]:
    """`build_model` from the file's own config, weights loaded strictly, eval mode: (model, Config)."""
    from llm_dist.config import Config, apply_dict
    from llm_dist.model.transformer import build_model

    tensors, config, _ = load_safetensors(path)
    if config is None:
        raise CheckpointToolError(f"{path}: no llm_dist config in its metadata (expected a file written by "
                                  "tools/checkpoint.py)")
    cfg = Config()
    apply_dict(cfg, config)
    model = build_model(cfg.model, device)
    model.load_state_dict(tensors, strict=True)
    return model.eval(), cfg


# ------------------------------------------------------------------------------------------------------ pt


def save_pt(tensors: dict[str, torch.Tensor], out: str, config: dict | None = None,
            dtype: torch.dtype | None = None) -> dict:
    """A plain state dict file; tied aliases share one tensor (torch.save keeps the sharing)."""
    ties = _tied_keys(config, set(tensors))
    sd: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k not in ties:
            sd[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    for alias, stored in ties.items():
        sd[alias] = sd[stored]
    sd = {k: sd[k] for k in tensors}  # the original key order
    out_path = Path(out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    torch.save(sd, tmp)
    os.replace(tmp, out_path)
    return {"path": str(out_path), "tensors": len(sd), "bytes": out_path.stat().st_size, "tied": ties}


def load_pt(path: str) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} state dict, read with `weights_only=True` (no arbitrary unpickling)."""
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointToolError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - UnpicklingError, zip errors, ...: all mean "not a weights file"
        # torch's message is a long lecture; the useful part is what the weights-only unpickler refused.
        detail = str(e).split("WeightsUnpickler error:", 1)[-1].split("Check the documentation")[0]
        detail = " ".join(detail.split()).split(". Please use")[0][:160]
        raise CheckpointToolError(f"{path}: not a torch state dict loadable with weights_only=True "
                                  f"({type(e).__name__}: {detail})") from None
    if not isinstance(sd, dict) or not sd or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                      for k, v in sd.items()):
        raise CheckpointToolError(f"{path}: expected a flat state dict {{name: tensor}}, got {type(sd).__name__}")
    return sd


# ------------------------------------------------------------------------------------------- consolidate


def _checkpoint_extra(url: str) -> dict[str, Any]:
    meta = _read_json_or_none(url, "meta.json") or {}
    return {"source": url, "step": str(meta.get("step", "")), "tokens_seen": str(meta.get("tokens_seen", "")),
            "tokenizer": _read_json_or_none(url, tokenizer_record_name(url))}


def _complete(path: str) -> str:
    """`resolve`, refusing a checkpoint that is incomplete or fails verification (never export garbage)."""
    url = resolve(path)
    problem = verify(url, checksums=True)
    if problem is not None:
        raise CheckpointToolError(problem)
    if "lora_base" in (_read_json_or_none(url, "meta.json") or {}):  # adapters only: not a whole model
        raise CheckpointToolError(f"{url}: a LoRA checkpoint (adapters of {read_json(url, 'meta.json')['lora_base']['url']}); "
                                  "export it with tools/checkpoint.py merge-lora")
    return url


def consolidate(path: str, out: str, dtype: torch.dtype | None = None) -> dict:
    """DCP checkpoint (any world size) -> one safetensors file of the model weights + config metadata."""
    url = _complete(path)
    config = read_run_config(url)
    summary = save_safetensors(read_model_tensors(url), out, config, _checkpoint_extra(url), dtype)
    return {**summary, "source": url}


def config_from(path: str) -> dict:
    """A run config dict from a checkpoint (dir), a safetensors file's metadata, or a YAML config file."""
    if Path(path).suffix.lower() in (".yaml", ".yml"):
        return _yaml_config(path)
    fmt = detect_format(path)
    if fmt == "dcp":
        return read_run_config(resolve(path))
    if fmt == "safetensors":
        _, config, _ = load_safetensors(path)
        if config is None:
            raise CheckpointToolError(f"{path}: no llm_dist config in its metadata")
        return config
    raise CheckpointToolError(f"{path}: not a config source (expected a checkpoint dir, a .safetensors file "
                              "or a config .yaml)")


def _yaml_config(path: str) -> dict:
    if not os.path.isfile(path):
        raise CheckpointToolError(f"{path}: no such file (expected a run config .yaml)")
    try:
        cfg = safe_load_unique(Path(path).read_text(encoding="utf-8"))  # a duplicate key is refused, not last-wins
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise CheckpointToolError(f"{path}: not YAML ({' '.join(str(e).split())[:160]})") from None
    if not isinstance(cfg, dict) or not isinstance(cfg.get("model"), dict):
        raise CheckpointToolError(f"{path}: not a run config (expected a mapping with a 'model' section)")
    return cfg


def convert(src: str, out: str, to: str | None = None, dtype: torch.dtype | None = None,
            config: str | None = None) -> dict:
    """Convert weights between formats: dcp -> safetensors|pt, safetensors <-> pt (and same-format recasts).

    `to` defaults to the output's extension. `config` (a checkpoint, safetensors or YAML path) supplies the
    run config where the source has none (a .pt source going to safetensors) or overrides it.
    """
    src_fmt = detect_format(src)
    if to is None:
        to = {".safetensors": "safetensors", ".pt": "pt", ".pth": "pt", ".bin": "pt"}.get(Path(out).suffix.lower())
        if to is None:
            raise CheckpointToolError(f"{out}: cannot tell the output format from its extension "
                                      "(expected .safetensors or .pt, or pass --to)")
    if to == "dcp":
        raise CheckpointToolError("converting to a DCP checkpoint is not supported: a resumable checkpoint needs "
                                  "optimizer, loader and RNG state that a weights file does not have")
    if to not in FORMATS:
        raise CheckpointToolError(f"--to {to}: unknown format (expected safetensors or pt)")
    cfg = config_from(config) if config else None
    extra: dict[str, Any] = {}
    if src_fmt == "dcp":
        url = _complete(src)
        tensors, cfg = read_model_tensors(url), cfg or read_run_config(url)
        extra = _checkpoint_extra(url)
    elif src_fmt == "safetensors":
        tensors, own_cfg, meta = load_safetensors(src)
        cfg = cfg or own_cfg
        extra = {k: meta[k] for k in ("source", "step", "tokens_seen", "tokenizer") if k in meta}
    else:
        tensors = load_pt(src)
    if config and cfg is not None:  # a wrong --config is reported under its own name
        check_against_config(tensors, cfg, config)
    if to == "safetensors":
        if cfg is None:
            raise CheckpointToolError(f"{src}: a .pt state dict has no config; pass --config (a checkpoint dir, "
                                      "a .safetensors file or the run's config.yaml)")
        if src_fmt == "pt":
            extra = {"source": src}
        summary = save_safetensors(tensors, out, cfg, extra, dtype)
    else:
        summary = save_pt(tensors, out, cfg, dtype)
    return {**summary, "source": src, "from": src_fmt, "to": to}


def compare_logits(checkpoint: str, weights: str, seed: int = 0) -> float:
    """Max |logits| difference between `sample.load_model(checkpoint)` and the model built from a safetensors
    file, on one random batch: 0.0 when the export is exact."""
    from llm_dist.sample import load_model

    ref, _, cfg = load_model(checkpoint)
    model, _ = build_from_safetensors(weights)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.model.vocab_size, (2, min(cfg.model.block_size, 32)), generator=g)
    with torch.no_grad():
        return float((ref(x).float() - model(x).float()).abs().max())
