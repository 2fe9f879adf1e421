"""Model and optimizer state through `torch.distributed.checkpoint` (DCP), with an index that is data, not code.

DCP writes each rank's shards in parallel with a global index, and reads them back for *any* sharding: a
checkpoint written by 2 FSDP ranks loads on 1 process, 3 ranks, or under DDP. State dicts come from
`get_state_dict` / go through `set_state_dict`, so parameter names are the bare model's (no `module.`,
`_orig_mod.` or activation-checkpoint prefixes) whatever wrappers are around it.

Safety: stock DCP pickles its index to `dcp/.metadata` and reads it with `pickle.load`, and reads non-tensor
values (the optimizer's hyper-parameters) with `torch.load(weights_only=False)`; either runs whatever code a
tampered checkpoint carries. Here:

- `SafeWriter` writes the index as JSON, `dcp/.metadata.json` (`dcp_metadata.py`: every field typed, dtypes
  by name from an allow-list), atomically like the stock writer; no pickle is written. A value the format
  cannot represent makes the save fail instead of being dropped.
- `SafeReader` reads `.metadata.json` when present and decodes it strictly (unknown keys, wrong types and
  dtypes outside the allow-list are refused). A legacy checkpoint (only a pickled `.metadata`) goes through
  a restricted unpickler that admits DCP's metadata classes, `torch.Size`, the allowed dtypes and checked
  stand-ins for layout / enum lookups and nothing else, and its result is re-validated by the same decoder.
- Values are read with `weights_only=True` (`SafeLoadPlanner`), tensors by DCP itself with `weights_only`.

Refused metadata raises `UnsafeCheckpointError` (one line naming the file), which callers must not treat as
"try an older checkpoint". Storage goes through fsspec (local paths, `file://`, and any fsspec URL such as
`s3://` when its filesystem package is installed).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import warnings
from concurrent.futures import Future
from io import UnsupportedOperation
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import filesystem as _dcp_filesystem
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
from torch.distributed.checkpoint.storage import WriteResult

from llm_dist.checkpoint import dcp_metadata
from llm_dist.checkpoint.dcp_metadata import MetadataRefused
from llm_dist.checkpoint.integrity import DigestingWriterMixin

try:  # torch >= 2.11 keeps them here; some releases also re-export them at the package level
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
except ImportError:  # pragma: no cover
    from torch.distributed.checkpoint import FsspecReader, FsspecWriter  # type: ignore[attr-defined]

METADATA_JSON = ".metadata.json"  # what SafeWriter writes (an ordinary file under dcp/)
LEGACY_METADATA = ".metadata"  # stock DCP's pickle: only read, from checkpoints written before SafeWriter


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read; the message names it and the first failure, in one line."""


class UnsafeCheckpointError(CheckpointReadError):
    """A checkpoint's metadata was refused (a pickle global, opcode or call outside DCP's own, a wrong type,
    a dtype outside the allow-list, ...): it may have been crafted to run code. A hard stop, never a reason
    to fall back to an older checkpoint."""


class MetadataSaveError(RuntimeError):
    """The state to save holds metadata the JSON format cannot represent exactly; nothing was written."""


def one_line(text: object, limit: int = 400) -> str:
    """A message (an exception's, often multi-line) as one line of at most `limit` characters."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _metadata_name(rank: int | None, name: str) -> str:
    """DCP's naming: `<name>` for the global index, `__<rank><name>` for a rank-local one (no collectives)."""
    return name if rank is None else f"__{rank}{name}"


class SafeWriter(FsspecWriter):
    """FsspecWriter whose `finish` writes the index as JSON (`.metadata.json`) instead of pickling it.

    Everything else the stock `finish` does is kept: the DCP version, `storage_data` gathered from every
    rank's write results, `storage_meta`, a temporary file synced to disk and renamed into place (so a reader
    never sees half an index), and the rank-local name when DCP runs without collectives.
    """

    def _get_metadata_path(self, rank: int | None = None) -> os.PathLike:
        # Also what the stock `_metadata_exists` overwrite check looks for: our index, not a pickle.
        return self.fs.concat_path(self.path, _metadata_name(rank, METADATA_JSON))  # type: ignore[return-value]

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        version = getattr(_dcp_filesystem, "CURRENT_DCP_VERSION", None)
        if version is not None:
            metadata.version = version
        storage_md = {}
        for wr_list in results:
            storage_md.update({wr.index: wr.storage_data for wr in wr_list})
        metadata.storage_data = storage_md
        metadata.storage_meta = self.storage_meta()
        try:  # encode before touching the directory: a refused value leaves no index at all
            data = dcp_metadata.dumps_json(metadata)
        except MetadataRefused as e:
            raise MetadataSaveError(f"checkpoint {self.path}: refusing to save, the DCP metadata cannot be "
                                           f"stored as data ({one_line(e)})") from None
        rank = getattr(self, "rank", None)
        local = not getattr(self, "use_collectives", True) and rank is not None
        final = self._get_metadata_path(rank if local else None)
        tmp = self.fs.concat_path(self.path, _metadata_name(rank if local else None, METADATA_JSON) + ".tmp")
        with self.fs.create_stream(tmp, "wb") as f:
            f.write(data)
            if getattr(self, "sync_files", True):
                try:
                    os.fsync(f.fileno())
                except (AttributeError, UnsupportedOperation):
                    os.sync()  # as the stock writer: a stream without a file descriptor
        if self.fs.exists(final):
            self.fs.rm_file(final)
        self.fs.rename(tmp, final)


class SafeReader(FsspecReader):
    """FsspecReader that reads `.metadata.json` strictly, or a legacy `.metadata` through the strict unpickler.

    Raises `UnsafeCheckpointError` for refused metadata, `CheckpointReadError` when there is none.
    """

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = self._decode(kwargs.get("rank"))
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def _decode(self, rank: int | None) -> Metadata:
        json_path = self.fs.concat_path(self.path, _metadata_name(rank, METADATA_JSON))
        legacy_path = self.fs.concat_path(self.path, _metadata_name(rank, LEGACY_METADATA))
        # The JSON index wins whenever it exists: a pickle next to it is never opened.
        path, legacy = (json_path, False) if self.fs.exists(json_path) else (legacy_path, True)
        if not self.fs.exists(path):
            raise CheckpointReadError(f"checkpoint {self.path}: no DCP metadata ({METADATA_JSON}, or "
                                      f"{LEGACY_METADATA} of an older checkpoint)")
        with self.fs.create_stream(path, "rb") as f:
            data = f.read()
        try:
            return dcp_metadata.unpickle_legacy(data) if legacy else dcp_metadata.loads_json(data)
        except MetadataRefused as e:
            raise UnsafeCheckpointError(f"checkpoint {os.fspath(path)}: {one_line(e)} (refusing to load it)") from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner that deserialises non-tensor values with `weights_only=True`."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            from torch.distributed.checkpoint._nested_dict import set_element  # noqa: PLC0415

            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


def _options(trainable_only: bool) -> StateDictOptions | None:
    # trainable_only (LoRA): frozen parameters (the base model, kept elsewhere) are neither saved nor expected.
    # strict=False lets load_state_dict skip them; a missing *trainable* tensor still fails in DCP's load.
    return StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None


def model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool = False
                      ) -> dict[str, Any]:
    """{"model": ..., "optim": ...} keyed by bare parameter names; DTensors stay sharded (no gather).
    `trainable_only`: only parameters with requires_grad (a LoRA run's adapters), not the frozen base."""
    msd, osd = get_state_dict(model, optimizer, options=_options(trainable_only))
    if trainable_only:  # ignore_frozen_params keeps a frozen tied alias (lm_head.weight = tok_emb.weight): drop it
        keep = {n.replace("._checkpoint_wrapped_module", "")
                for n, p in model.named_parameters(remove_duplicate=False) if p.requires_grad}
        msd = {k: v for k, v in msd.items() if k in keep}
    return {"model": msd, "optim": osd}


def apply_model_optim_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any],
                            trainable_only: bool = False) -> None:
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(trainable_only))


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


class DigestingWriter(DigestingWriterMixin, SafeWriter):
    """SafeWriter that also records the checksums of the shard files it writes (see integrity.py)."""


def save(state: dict[str, Any], path: str, process_group: dist.ProcessGroup | None = None,
         asynchronous: bool = False, stager: Any | None = None, sums_root: str | None = None,
         extra_sums: dict[str, list[str]] | None = None) -> tuple[Future | None, Future | None]:
    """Write `state` under `path` (collective). Returns (staged, written) futures; (None, None) when sync.

    With `sums_root` (the checkpoint directory above `path`), each rank also writes the checksums of its
    shard files and of `extra_sums` to `<sums_root>/sums/rank_<r>.json` before DCP's coordinator finishes.

    Async: the state is copied to CPU (by `stager` in the background, else before returning) and written by
    a background thread; `staged` completes when the copy is done, i.e. when the live tensors may change.
    """
    writer = DigestingWriter(path) if sums_root is not None else SafeWriter(path)
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


def load(state: dict[str, Any], path: str, partial: bool = False) -> None:
    """Fill `state` (a template with the right keys, shapes and shardings) in place from `path`.

    The metadata is decoded (and refused, with `UnsafeCheckpointError`) here, before DCP starts: inside
    `dcp.load` a read failure is logged with a traceback and folded into a generic error. DCP raises the same
    `CheckpointException` on every rank when any rank fails (it derives from BaseException); it becomes one
    `CheckpointReadError` so callers can fall back consistently.
    """
    reader = SafeReader(path)
    reader.read_metadata()  # every rank reads the same file, so all raise alike and no collective is left waiting
    try:
        with _quiet_dcp():
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=partial))
    except CheckpointException as e:
        first = next(iter(e.failures.values()))[0]
        if isinstance(first, UnsafeCheckpointError):
            raise UnsafeCheckpointError(str(first)) from None
        detail = " ".join(str(first).split())[:300]
        raise CheckpointReadError(f"checkpoint {path}: cannot be read ({type(first).__name__}: {detail})") from None


def load_model_weights(model: nn.Module, path: str) -> None:
    """Load only the model part of a checkpoint into an unsharded model (one process, no optimizer)."""
    sd = {"model": model.state_dict()}
    load(sd, path, partial=True)
    model.load_state_dict(sd["model"])


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded CPU copy of the model's state (collective under FSDP)."""
    return get_state_dict(model, [], options=StateDictOptions(full_state_dict=True, cpu_offload=True))[0]
