"""The frozen reference policy of DPO: built sharded like the policy, or run once over the data beforehand.

Two ways to get the reference log-probs (`dpo.precompute_ref`):
  false  the reference is a second copy of the initial weights, sharded exactly like the policy (FSDP/HSDP:
         its own 1/W shard per rank; DDP or one process: a whole copy per rank, as DDP replicates the
         policy), frozen (no gradients, no optimizer state) and run under no_grad on each micro-batch.
         Memory: + 1x the parameters (the policy itself holds ~4x: weights, gradients, two Adam moments).
  true   the same module runs once over every train and held-out pair before training, then is freed:
         training then needs the memory of the policy alone, plus two floats per pair on every rank. The
         values are written to `<out_dir>/dpo_ref_logps.safetensors` (tensors, no pickle) with a
         fingerprint of the init checkpoint and the token ids, so a resumed run reads them back instead of
         recomputing them under another batching (on another world size).
The pass splits the pairs into fixed chunks of `train.micro_batch_size` pairs in file order, chunk c on rank
c mod W (every rank runs the same number of forwards: FSDP gathers weights collectively), and sums the
ranks' disjoint rows with one all-reduce (x + 0 is exact): the result does not depend on the world size.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from array import array
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn

from llm_dist import distributed as D
from llm_dist.align.dpo_loss import sequence_logps
from llm_dist.config import Config
from llm_dist.distributed import Runtime
from llm_dist.parallel import build_parallel_model, resolve_strategy
from llm_dist.reward.data import TokenPair, pair_tensors
from llm_dist.stages import init_from_checkpoint

CACHE_NAME = "dpo_ref_logps.safetensors"


def build_reference(cfg: Config, rt: Runtime, amp_dtype: torch.dtype, init_url: str | None) -> nn.Module:
    """The initial policy, frozen and in eval mode, sharded like the policy (see the module docstring).

    Without `init_url` it gets the same seeded initialisation the policy got, so it is the initial policy
    either way. Collective under FSDP/HSDP (every rank calls it).
    """
    ref_cfg = copy.deepcopy(cfg)
    strategy = resolve_strategy(cfg.parallel.strategy, rt.world_size)
    if strategy == "ddp":  # DDP wraps trainable modules only; a bare replica per rank is the same layout
        ref_cfg.parallel.strategy = "single"
    ref_cfg.parallel.ac = "none"  # nothing is kept for a backward: recomputation would buy nothing
    ref = build_parallel_model(ref_cfg, rt, amp_dtype).model
    if init_url is not None:
        init_from_checkpoint(ref, init_url, cfg.model.vocab_size)
    return ref.eval().requires_grad_(False)


def data_fingerprint(init_url: str | None, *splits: Sequence[TokenPair]) -> str:
    """sha256 of the init checkpoint's path and every pair's token ids: what the cached values depend on."""
    h = hashlib.sha256(json.dumps(init_url).encode())
    for pairs in splits:
        h.update(b"|split")
        for p in pairs:  # lengths first: the concatenation alone would not say where one sequence ends
            h.update(array("q", [len(p.chosen), len(p.rejected), p.chosen_start, p.rejected_start,
                                 *p.chosen, *p.rejected]).tobytes())
    return h.hexdigest()


@torch.no_grad()
def compute_reference_logps(reference: nn.Module, pairs: Sequence[TokenPair], chunk: int, pad_id: int,
                            device: torch.device, autocast) -> torch.Tensor:  # noqa: ANN001
    """Summed reference log-probs (N, 2) fp32 [chosen, rejected] of every pair, the same on every rank."""
    rank, world = D.get_rank(), D.get_world_size()
    n_chunks = -(-len(pairs) // chunk)
    n_chunks += -n_chunks % world  # whole rounds: every rank runs the same number of forwards
    out = torch.zeros(len(pairs), 2, dtype=torch.float64, device=device)
    for c in range(rank, n_chunks, world):
        part = list(pairs[c * chunk:(c + 1) * chunk])
        batch = pair_tensors(part or [None], pad_id, targets=True)  # an empty round-up chunk: one padding pair
        x, tgt = batch[0].to(device), batch[4].to(device)
        with autocast():
            logps, _ = sequence_logps(reference(x), tgt)  # (2m,)
        m = len(part)
        if m:
            out[c * chunk:c * chunk + m] = torch.stack([logps[:m], logps[m:2 * m]], dim=1).double()
    return D.all_reduce_sum(out).float().cpu()


def read_cache(path: Path, fingerprint: str) -> dict[str, torch.Tensor] | None:
    """The cached tensors when the file exists and was made from the same init and data, else None."""
    from safetensors import safe_open

    if not path.exists():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            if (f.metadata() or {}).get("fingerprint") != fingerprint:
                D.warn0(f"{path}: made from another init checkpoint or other data; recomputing it")
                return None
            return {k: f.get_tensor(k) for k in f.keys()}
    except (OSError, ValueError, RuntimeError) as e:  # damaged: recompute rather than train on garbage
        D.warn0(f"{path}: unreadable ({type(e).__name__}: {e}); recomputing it")
        return None


def write_cache(path: Path, tensors: dict[str, torch.Tensor], fingerprint: str) -> None:
    """Rank 0 writes the file atomically (a crash leaves the old file or none, never half of one)."""
    from safetensors.torch import save_file

    if not D.is_main():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata={"fingerprint": fingerprint})
    os.replace(tmp, path)


def precompute_reference(cfg: Config, rt: Runtime, amp_dtype: torch.dtype, init_url: str | None, out_dir: Path,
                         splits: dict[str, Sequence[TokenPair]], pad_id: int, autocast) -> str:  # noqa: ANN001
    """Set `TokenPair.ref` of every pair of every split, from the cache or from one pass of a temporary
    reference (collective). Returns a line saying which."""
    path = out_dir / CACHE_NAME
    fp = data_fingerprint(init_url, *splits.values())
    cached = read_cache(path, fp)
    ok = cached is not None and all(k in cached and cached[k].shape == (len(v), 2) for k, v in splits.items())
    missing = D.all_reduce_sum(torch.tensor([0.0 if ok else 1.0], device=rt.device)).item()
    if missing:  # some rank lacks it: every rank computes (the pass is collective under FSDP)
        reference = build_reference(cfg, rt, amp_dtype, init_url)
        cached = {k: compute_reference_logps(reference, v, cfg.train.micro_batch_size, pad_id, rt.device, autocast)
                  for k, v in splits.items()}
        del reference
        write_cache(path, cached, fp)
        how = f"computed in one pass and saved to {path}"
    else:
        how = f"read from {path}"
    for k, pairs in splits.items():
        for p, (c, r) in zip(pairs, cached[k].tolist()):
            p.ref = (c, r)
    return how
