"""Model and optimizer state through `torch.distributed.checkpoint` (DCP), loaded without unpickling.

DCP writes each rank's shards in parallel with a global `.metadata` index, and reads them back for *any*
sharding: a checkpoint written by 2 FSDP ranks loads on 1 process, 3 ranks, or under DDP. State dicts come
from `get_state_dict` / go through `set_state_dict`, so parameter names are the bare model's (no `module.`,
`_orig_mod.` or activation-checkpoint prefixes) whatever wrappers are around it.

Safety: stock DCP reads `.metadata` with `pickle.load` and non-tensor values (the optimizer's
hyper-parameters) with `torch.load(weights_only=False)`. Here the metadata goes through an unpickler that
only admits DCP's own metadata classes and plain containers, and values through `weights_only=True`, so a
tampered checkpoint cannot run code on load. Storage goes through fsspec (local paths, `file://`, and any
fsspec URL such as `s3://` when its filesystem package is installed).
"""

from __future__ import annotations

import contextlib
import io
import logging
import pickle
import posixpath
import warnings
from concurrent.futures import Future
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from llm_dist.checkpoint.integrity import DigestingWriterMixin

try:  # torch >= 2.11 keeps them here; some releases also re-export them at the package level
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint import FsspecReader, FsspecWriter  # type: ignore[attr-defined]

# Modules whose classes may appear in DCP's .metadata pickle (dataclasses describing tensors and files).
_SAFE_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem",
                 "torch.distributed.checkpoint.planner", "torch.distributed.checkpoint._extension")
_SAFE_BUILTINS = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "str",
                                            "bytes", "bool", "complex", "slice", "getattr")}
_SAFE_OTHER = {("collections", "OrderedDict"), ("torch", "Size"), ("torch.serialization", "_get_layout"),
               ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}


class _MetadataUnpickler(pickle.Unpickler):
    """Admits DCP metadata dataclasses, torch dtypes/layouts/Size and builtin containers; nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if module.startswith(_SAFE_MODULES) or (module, name) in _SAFE_BUILTINS | _SAFE_OTHER:
            return super().find_class(module, name)
        if module == "torch" and (name.startswith(("float", "bfloat", "int", "uint", "bool", "complex"))
                                  or name in ("strided", "sparse_coo", "contiguous_format", "preserve_format")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeReader(FsspecReader):
    """FsspecReader whose metadata is read with the restricted unpickler."""

    def read_metadata(self, *args: Any, **kwargs: Any):  # noqa: ANN201 - returns dcp Metadata
        path = self._get_metadata_path(kwargs.get("rank"))
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        if getattr(metadata, "storage_meta", None) is None:
            from torch.distributed.checkpoint.metadata import StorageMeta

            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that deserialises non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """{"model": ..., "optim": ...} keyed by bare parameter names; DTensors stay sharded (no gather)."""
    msd, osd = get_state_dict(model, optimizer)
    return {"model": msd, "optim": osd}


def apply_model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def make_stager() -> Any | None:
    """A DCP stager that copies state to CPU in a background thread, reusing its buffers across saves.

    Pinned memory and non-blocking copies on CUDA. None where this torch has no DefaultStager (then
    `async_save` stages synchronously, inside the call).
    """
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions
    except ImportError:  # pragma: no cover - older torch
        return None
    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=True,
                                        use_non_blocking_copy=cuda))


class DigestingWriter(DigestingWriterMixin, FsspecWriter):
    """FsspecWriter that also records the checksums of the shard files it writes (see integrity.py)."""


def save(state: dict[str, Any], path: str, process_group: dist.ProcessGroup | None = None,
         asynchronous: bool = False, stager: Any | None = None, sums_root: str | None = None,
         extra_sums: dict[str, list[str]] | None = None) -> tuple[Future | None, Future | None]:
    """Write `state` under `path` (collective). Returns (staged, written) futures; (None, None) when sync.

    With `sums_root` (the checkpoint directory above `path`), each rank also writes the checksums of its
    shard files and of `extra_sums` to `<sums_root>/sums/rank_<r>.json` before DCP's coordinator finishes.

    Async: the state is copied to CPU (by `stager` in the background, else before returning) and written by
    a background thread; `staged` completes when the copy is done, i.e. when the live tensors may change.
    """
    writer = DigestingWriter(path) if sums_root is not None else FsspecWriter(path)
    if sums_root is not None:
        writer.sums_root, writer.sums_prefix = sums_root, posixpath.basename(path.rstrip("/"))
        writer.extra_sums, writer.sums_rank = dict(extra_sums or {}), dist.get_rank() if dist.is_initialized() else 0
    if not asynchronous:
        with _quiet_dcp():
            dcp.save(state, storage_writer=writer, process_group=process_group)
        return None, None
    kwargs = {"async_stager": stager} if stager is not None else {}
    with _quiet_dcp():
        resp = dcp.async_save(state, storage_writer=writer, process_group=process_group, **kwargs)
    if hasattr(resp, "upload_completion"):  # AsyncSaveResponse: staging runs in the background
        return resp.staging_completion, resp.upload_completion
    done = Future()
    done.set_result(None)
    return done, resp


# DCP warns on every save/load without a process group that it "assumes the intent is a single process",
# which is exactly the intent here. Installed once for the process (not per call): async saves call DCP
# from a background thread, after any per-call `catch_warnings` has already restored the filters.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")


def _dcp_metadata_fallback_record(record: logging.LogRecord) -> bool:
    """False for DCP's "metadata is not found" warnings: logged on the root logger with a full traceback
    each time a checkpoint's metadata cannot be read, although the load then fails with its own error,
    which the callers report in one line (and fall back from)."""
    msg = str(record.msg)
    return not (msg.startswith(("Global metadata is not found", "Rank local metadata is not found"))
                and record.pathname.endswith("state_dict_loader.py"))


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP logs tracebacks for metadata it then reports as an error anyway: silenced during our calls."""
    root = logging.getLogger()
    root.addFilter(_dcp_metadata_fallback_record)
    try:
        yield
    finally:
        root.removeFilter(_dcp_metadata_fallback_record)


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read; the message names it and the first failure, in one line."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint file asks for something a data-only load never does (a refused pickle global): treated
    as an attack, not as damage, so callers stop instead of falling back to an older checkpoint."""


def load(state: dict[str, Any], path: str, partial: bool = False) -> None:
    """Fill `state` (a template with the right keys, shapes and shardings) in place from `path`.

    DCP raises the same `CheckpointException` on every rank when any rank fails (it derives from
    BaseException); it becomes one `CheckpointReadError` so callers can fall back consistently.
    """
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=SafeReader(path), planner=SafeLoadPlanner(allow_partial_load=partial))
    except CheckpointException as e:
        first = next(iter(e.failures.values()))[0]
        detail = " ".join(str(first).split())[:300]
        if isinstance(first, pickle.UnpicklingError) or "which is not allowed" in detail:  # a refused global
            raise UnsafeCheckpointError(f"checkpoint {path}: cannot be read ({type(first).__name__}: {detail})"
                                        ) from None
        raise CheckpointReadError(f"checkpoint {path}: cannot be read ({type(first).__name__}: {detail})") from None


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load only the model part of a checkpoint into an unsharded model (one process, no optimizer)."""
    sd = {"model": model.state_dict()}
    load(sd, path, partial=True)
    model.load_state_dict(sd["model"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the model's state (collective under FSDP)."""
    return get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
