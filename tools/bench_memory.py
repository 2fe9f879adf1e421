"""Memory per rank of single / DDP / FSDP and activation checkpointing none / selective / full, with step time.

    python tools/bench_memory.py                                   # defaults: 8 layers x 512, seq 512, vocab 8192
    python tools/bench_memory.py --layers 4 --width 256 --seq 128  # quicker
    python tools/bench_memory.py --out runs/bench_memory.json

Memory: every (strategy, AC) configuration runs in a fresh process (ddp/fsdp: 2 ranks under
`torch.distributed.run`, gloo on CPU, NCCL on >= 2 GPUs), so allocator state and RSS never carry over from
one configuration to the next. Time: one more process (group) per strategy builds every AC variant and runs
their steps interleaved round-robin, so background load on a shared machine hits all of them alike. Each
rank writes one JSON record; this process collects them, computes the ratios against the baselines
measured by the same command, prints one table and writes --out.

What is measured, per rank, and how (CPU has no allocator peak counter and RSS is dominated by the runtime,
so the memory figures are exact byte counts of tensors rather than process sizes):

state       bytes of the rank's local parameters (DTensor `.to_local()` under FSDP), gradients and AdamW
            state tensors, taken after backward at the point where all three coexist (just before
            `optimizer.step`), after a warm-up step has created the optimizer state. Counted per
            *storage*, each once: tied weights share one storage; FSDP's gradients are views into one
            reduce-scatter buffer per group; FSDP's padded shards count with their padding.
saved       bytes of the unique storages that autograd saves for backward during one forward, seen by
            `torch.autograd.graph.saved_tensors_hooks` (parameters excluded: they are state, not
            activations). Non-reentrant checkpointing saves a checkpointed block's inputs through these
            hooks and hides everything inside the block behind its own inner hooks, so under full AC the
            hooks see exactly what checkpointing keeps; the tool verifies this (`full_saves_only_inputs`).
            Selective (op-level) AC stores the outputs it must save in its own cache, which the hooks do
            not see, hence:
activation  bytes of the unique storages allocated during the forward (every op's outputs, via a
            TorchDispatchMode) that are still alive when the forward returns, parameters excluded: what
            the forward really leaves in memory for backward, whichever mechanism keeps it. This is the
            figure the AC goal is judged on; it equals `saved` except under op-level selective AC.
rss         peak process RSS (psutil, sampled every millisecond) during one plain step minus the RSS
            before the model was built: context only (includes DDP's gradient buckets, temporaries,
            allocator slack).
cuda        on CUDA, `torch.cuda.max_memory_allocated` over the timed steps.
step time   median of --steps timed `Trainer.train_step`s per AC mode after --warmup untimed ones, the
            modes' steps interleaved in one process; the slowest rank's median for ddp/fsdp.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import psutil
import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from a checkout without installing

MiB = 2**20
AC_MODES = ("none", "selective-op", "selective-layer", "full")
STRATEGIES = ("single", "ddp", "fsdp")
# Goals of issue 3 (scale).
STATE_GOAL = 0.55  # FSDP state per rank <= 55% of DDP's
ACT_GOAL = 0.40  # full AC keeps <= 40% of AC-none activation memory (a cut of >= 60%)
TIME_GOAL = 1.35  # ... for <= 35% more step time


# ------------------------------------------------------------------------------------------- accounting

def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """The tensor this rank actually holds: a DTensor's local shard, anything else as is."""
    return t.to_local() if isinstance(t, DTensor) else t


def storage_key(t: torch.Tensor) -> int:
    """Identity of the storage behind a tensor: views, tied weights and aliases map to the same key.

    The storage object's identity, not its data pointer: FSDP frees an unsharded parameter's memory in
    place (`resize_(0)`) and the allocator hands that address to the next activation, which must not
    inherit the parameter's identity.
    """
    return local_tensor(t).untyped_storage()._cdata


def unique_storage_bytes(tensors: Iterable[torch.Tensor], seen: set[int] | None = None) -> int:
    """Bytes of the distinct storages behind `tensors` (whole storage: a view costs what it keeps alive).

    `seen` is shared across calls so that a storage counted in one category is not counted again in another.
    """
    seen = set() if seen is None else seen
    total = 0
    for t in tensors:
        s = local_tensor(t).untyped_storage()
        key = s._cdata
        if key in seen or s.nbytes() == 0:  # nbytes 0: a freed FSDP unsharded buffer, holds nothing
            continue
        seen.add(key)
        total += s.nbytes()
    return total


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """Every tensor in the optimizer's per-parameter state (AdamW: exp_avg, exp_avg_sq, step)."""
    return [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]


def state_bytes(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Parameters + gradients + optimizer state held by this rank, each storage counted once."""
    seen: set[int] = set()
    params = list(model.parameters())
    out = {
        "params": unique_storage_bytes(params, seen),
        "grads": unique_storage_bytes([p.grad for p in params if p.grad is not None], seen),
        "optim": unique_storage_bytes(optimizer_tensors(optimizer), seen),
    }
    out["total"] = sum(out.values())
    return out


def is_parameter(t: torch.Tensor) -> bool:
    """A parameter or a view of one (e.g. the transposed weight addmm saves): state, not an activation."""
    base = t._base if t._base is not None else t
    return base.is_leaf and base.requires_grad


class _LiveOutputs(TorchDispatchMode):
    """Records a weak reference to the storage of every op output, to see which survive the forward."""

    def __init__(self, meter: "ActivationMeter") -> None:
        super().__init__()
        self.meter = meter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and not isinstance(t, DTensor):
                self.meter._allocated(t)
        return out


@dataclass
class ActivationMeter:
    """Measures what one forward keeps for backward: `with ActivationMeter(blocks) as m: loss = f(x)`.

    `root` is the bare model, `blocks` its transformer blocks (as wrapped by AC/FSDP): saved storages are attributed to
    the block whose forward saved them, and each block's input storages are recorded, so that one can check
    that full AC saves exactly the block inputs. Parameters, including FSDP's all-gathered (unsharded) ones,
    are excluded from both figures.
    """

    root: nn.Module
    blocks: Iterable[nn.Module]
    saved: dict[int, int] = field(default_factory=dict)  # storage -> bytes (hooks)
    saved_region: dict[int, str] = field(default_factory=dict)  # storage -> "block<i>" | "outside"
    block_inputs: dict[str, set[int]] = field(default_factory=dict)
    _live: dict[int, tuple[StorageWeakRef, int]] = field(default_factory=dict)
    _params: dict[int, StorageWeakRef] = field(default_factory=dict)
    _region: str = "outside"
    _stack: ExitStack = field(default_factory=ExitStack)

    # hooks ------------------------------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not is_parameter(t):
            key = storage_key(t)
            self.saved[key] = local_tensor(t).untyped_storage().nbytes()
            self.saved_region.setdefault(key, self._region)
        return t  # keep the tensor itself: the measurement must not change what is kept

    def _allocated(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s._cdata
        old = self._live.get(key)
        if old is None or old[0].expired():  # a freed storage's slot reused by a new one: track the new one
            self._live[key] = (StorageWeakRef(s), s.nbytes())

    def _note_params(self, module: nn.Module) -> None:
        # Inside a module's forward (after FSDP's pre-forward all-gather) its parameters are the unsharded ones.
        for p in module.parameters():
            s = local_tensor(p).untyped_storage()
            self._params[s._cdata] = StorageWeakRef(s)

    def _enter_block(self, name: str):  # noqa: ANN202
        def pre(module: nn.Module, args: tuple) -> None:
            self._note_params(module)
            self._region = name
            self.block_inputs[name] = {storage_key(a) for a in args if isinstance(a, torch.Tensor)}

        def post(module: nn.Module, args: tuple, output: Any) -> None:
            self._region = "outside"

        return pre, post

    # context ----------------------------------------------------------------------------------------
    def __enter__(self) -> "ActivationMeter":
        # The root's own parameters (embeddings, final norm) are gathered in its pre-forward under FSDP.
        self._stack.callback(self.root.register_forward_pre_hook(lambda m, args: self._note_params(m)).remove)
        for i, block in enumerate(self.blocks):
            pre, post = self._enter_block(f"block{i}")
            # Appended after FSDP's own pre-hook, so the parameters seen are the all-gathered ones.
            self._stack.callback(block.register_forward_pre_hook(pre).remove)
            self._stack.callback(block.register_forward_hook(post).remove)
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        self._stack.enter_context(_LiveOutputs(self))
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # results ----------------------------------------------------------------------------------------
    def _is_param(self, key: int) -> bool:
        ref = self._params.get(key)
        return ref is not None and not ref.expired()

    @property
    def saved_bytes(self) -> int:
        return sum(b for k, b in self.saved.items() if not self._is_param(k))

    def saved_bytes_in(self, region_prefix: str) -> int:
        return sum(b for k, b in self.saved.items() if not self._is_param(k)
                   and self.saved_region[k].startswith(region_prefix))

    @property
    def live_bytes(self) -> int:
        """Storages allocated during the forward and still alive now (call right after the forward)."""
        return sum(n for k, (ref, n) in self._live.items() if not ref.expired() and not self._is_param(k))

    def full_ac_saves_only_inputs(self) -> bool:
        """True when every block saved exactly its own inputs' storages and nothing else."""
        for name, inputs in self.block_inputs.items():
            saved_here = {k for k, r in self.saved_region.items() if r == name and not self._is_param(k)}
            if saved_here != inputs:
                return False
        return bool(self.block_inputs)


class RSSPeak:
    """Peak RSS of this process over a `with` block, sampled from a thread (CPU has no allocator peak)."""

    def __init__(self, interval_s: float = 0.001) -> None:
        self.proc, self.interval_s = psutil.Process(), interval_s
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __enter__(self) -> "RSSPeak":
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


# ------------------------------------------------------------------------------------------- one config

def ac_overrides(ac: str) -> list[str]:
    """Table name -> parallel.* overrides."""
    if ac.startswith("selective-"):
        return ["parallel.ac=selective", f"parallel.ac_selective={ac.split('-', 1)[1]}"]
    return [f"parallel.ac={ac}"]


def build(a: argparse.Namespace, rt: Any, ac: str) -> Any:
    """A Trainer around the benchmark model for `a.strategy` and this AC mode."""
    from llm_dist.config import load_config
    from llm_dist.parallel import build_parallel_model
    from llm_dist.train.trainer import Trainer, resolve_dtype

    cfg = load_config(None, [
        f"model.vocab_size={a.vocab}", f"model.n_layer={a.layers}", f"model.n_embd={a.width}",
        f"model.n_head={a.heads}", f"model.block_size={a.seq}", "model.dropout=0.0", "model.tie_embeddings=true",
        *ac_overrides(ac), f"parallel.strategy={a.strategy}", f"train.micro_batch_size={a.batch}",
        f"train.batch_size={a.batch * rt.world_size}", f"train.dtype={a.dtype}", "optim.warmup_steps=0"])
    amp = resolve_dtype(cfg.train.dtype, rt.device)
    return Trainer(cfg, rt, build_parallel_model(cfg, rt, amp), amp_dtype=amp)


def batches(a: argparse.Namespace, rt: Any) -> Iterable[list[tuple[torch.Tensor, torch.Tensor]]]:
    """Endless random micro-batches (one per step), different on each rank as in training."""
    g = torch.Generator().manual_seed(1000 + rt.rank)
    while True:
        x = torch.randint(0, a.vocab, (a.batch, a.seq + 1), generator=g)
        yield [(x[:, :-1].contiguous().to(rt.device), x[:, 1:].contiguous().to(rt.device))]


# At least two untimed steps first: AdamW creates its state on the first, DDP rebuilds its gradient buckets
# in the second forward and FSDP finishes its lazy initialisation; none of that is an activation.
MIN_WARMUP = 2


def measure_memory(a: argparse.Namespace) -> dict:
    """Memory of one (strategy, AC) configuration, in a fresh process (one rank of it under torchrun)."""
    from llm_dist.distributed import runtime
    from llm_dist.train.trainer import causal_lm_loss

    proc = psutil.Process()
    with runtime(a.device) as rt:
        cuda = rt.device.type == "cuda"
        rss0 = proc.memory_info().rss  # the runtime alone: torch, the process group
        trainer = build(a, rt, a.ac)
        pm, data = trainer.pm, batches(a, rt)
        for _ in range(max(MIN_WARMUP, a.warmup)):
            trainer.train_step(next(data))

        # Forward under the meter, then backward: params + grads + optimizer state are all alive at once
        # here (the moment just before optimizer.step). No update is taken.
        pm.module.train()
        if cuda:
            torch.cuda.synchronize()
            before_fwd = torch.cuda.memory_allocated()
        with ActivationMeter(pm.model, pm.model.blocks) as meter:
            with trainer.autocast():
                loss, _ = causal_lm_loss(pm.module, next(data)[0])
        act = {"saved": meter.saved_bytes, "saved_in_blocks": meter.saved_bytes_in("block"),
               "live": meter.live_bytes, "full_saves_only_inputs": meter.full_ac_saves_only_inputs()}
        if cuda:
            act["cuda_forward_delta"] = torch.cuda.memory_allocated() - before_fwd
        del meter
        loss.backward()
        state = state_bytes(pm.model, trainer.optimizer)
        trainer.optimizer.zero_grad(set_to_none=True)
        del loss

        # One plain step for the process-level figures.
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with RSSPeak() as rss:
            trainer.train_step(next(data))
        rec = {"strategy": pm.strategy, "ac": a.ac, "rank": rt.rank, "world_size": rt.world_size,
               "device": str(rt.device), "threads": torch.get_num_threads(), "state": state, "activation": act,
               "rss_peak_delta": rss.peak - rss0,
               "n_params": sum(p.numel() for p in {id(p): p for p in pm.model.parameters()}.values())}
        if cuda:
            rec["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
    return rec


def measure_time(a: argparse.Namespace) -> dict:
    """Step times of every AC mode of one strategy, in one process, steps interleaved round-robin.

    Interleaving puts every mode under the same background load (a shared VM drifts by 2x within a
    minute), so the ratios against AC none compare like with like.
    """
    from llm_dist.distributed import runtime

    acs = [x for x in a.acs.split(",") if x]
    with runtime(a.device) as rt:
        cuda = rt.device.type == "cuda"
        trainers = {ac: build(a, rt, ac) for ac in acs}
        data = batches(a, rt)
        times: dict[str, list[float]] = {ac: [] for ac in acs}
        for r in range(max(MIN_WARMUP, a.warmup) + a.steps):
            order = acs[r % len(acs):] + acs[:r % len(acs)]  # rotate: no mode always runs first
            for ac in order:
                b = next(data)
                if cuda:
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                trainers[ac].train_step(b)  # ends in a host sync (loss and grad norm .tolist())
                if cuda:
                    torch.cuda.synchronize()
                if r >= max(MIN_WARMUP, a.warmup):
                    times[ac].append(time.perf_counter() - t0)
        return {"strategy": a.strategy, "rank": rt.rank, "step_times": times,
                "step_time": {ac: statistics.median(t) for ac, t in times.items()},
                "load_avg": os.getloadavg()}


# ------------------------------------------------------------------------------------------- launching

def child_env(threads: int) -> dict[str, str]:
    """No inherited rank variables (the children pick their own), and the thread count we mean."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_"))}
    env.update(OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    return env


def launch(mode: str, strategy: str, ac: str, a: argparse.Namespace, tmp: Path) -> list[dict]:
    """Run a memory (one AC) or timing (all ACs) worker in fresh process(es); returns one record per rank."""
    nproc = 1 if strategy == "single" else a.nproc
    threads = max(1, a.cores // nproc)  # the ranks share the machine's cores, as in real CPU training
    out = tmp / f"{mode}_{strategy}_{ac}"
    out.mkdir()
    worker = [str(Path(__file__).resolve()), "--worker", mode, "--strategy", strategy, "--ac", ac,
              "--threads", str(threads), "--worker-dir", str(out), *forwarded_args(a)]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *worker]
    else:
        cmd = [sys.executable, *worker]
    p = subprocess.run(cmd, cwd=REPO, env=child_env(threads), capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"{mode} {strategy}/{ac} failed ({p.returncode}):\n{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads(f.read_text()) for f in sorted(out.glob("rank*.json"))]


def forwarded_args(a: argparse.Namespace) -> list[str]:
    return ["--layers", str(a.layers), "--width", str(a.width), "--heads", str(a.heads), "--seq", str(a.seq),
            "--vocab", str(a.vocab), "--batch", str(a.batch), "--steps", str(a.steps), "--warmup", str(a.warmup),
            "--device", a.device, "--dtype", a.dtype, "--acs", a.acs]


# ------------------------------------------------------------------------------------------- report

def summarise(memory: dict[tuple[str, str], list[dict]], timing: dict[str, list[dict]]) -> tuple[list[dict], dict]:
    """Per-configuration rows (max over ranks: the largest rank bounds the job) and the goal verdicts."""
    rows = []
    for (strategy, ac), recs in memory.items():
        r0 = recs[0]
        t = timing.get(strategy)
        rows.append({
            "strategy": strategy, "ac": ac, "ranks": len(recs),
            "state_mib": max(r["state"]["total"] for r in recs) / MiB,
            "state_parts_mib": {k: v / MiB for k, v in r0["state"].items()},
            "activation_mib": max(r["activation"]["live"] for r in recs) / MiB,
            "saved_hooks_mib": max(r["activation"]["saved"] for r in recs) / MiB,
            "saved_in_blocks_mib": max(r["activation"]["saved_in_blocks"] for r in recs) / MiB,
            "full_saves_only_inputs": all(r["activation"]["full_saves_only_inputs"] for r in recs),
            "rss_delta_mib": max(r["rss_peak_delta"] for r in recs) / MiB,
            "cuda_max_allocated_mib": (max(r["cuda_max_allocated"] for r in recs) / MiB
                                       if "cuda_max_allocated" in r0 else None),
            # A step ends when the slowest rank's does.
            "step_time_s": max(r["step_time"][ac] for r in t) if t else None,
            "n_params": r0["n_params"], "threads_per_rank": r0["threads"], "device": r0["device"],
        })
    by = {(r["strategy"], r["ac"]): r for r in rows}
    for r in rows:
        base = by.get((r["strategy"], "none"))
        r["act_vs_none"] = r["activation_mib"] / base["activation_mib"] if base else None
        r["time_vs_none"] = (r["step_time_s"] / base["step_time_s"]
                             if base and r["step_time_s"] and base["step_time_s"] else None)
        ddp = by.get(("ddp", r["ac"]))
        r["state_vs_ddp"] = r["state_mib"] / ddp["state_mib"] if ddp else None

    goals: dict[str, Any] = {}
    if ("fsdp", "none") in by and ("ddp", "none") in by:
        ratio = by[("fsdp", "none")]["state_vs_ddp"]
        goals["fsdp_state_vs_ddp"] = {"ratio": ratio, "goal": STATE_GOAL, "met": ratio <= STATE_GOAL}
    for s in STRATEGIES:
        if (s, "full") in by and (s, "none") in by:
            f = by[(s, "full")]
            met = f["act_vs_none"] <= ACT_GOAL and f["time_vs_none"] is not None and f["time_vs_none"] <= TIME_GOAL
            goals[f"full_ac_{s}"] = {"activation_ratio": f["act_vs_none"], "cut": 1 - f["act_vs_none"],
                                     "time_ratio": f["time_vs_none"], "met": met,
                                     "verified_saves_only_block_inputs": f["full_saves_only_inputs"]}
    return rows, goals


def fmt(v: float | None, spec: str) -> str:
    return "" if v is None else format(v, spec)


def table(rows: list[dict]) -> str:
    head = ("| strategy | AC | state MiB/rank | vs DDP | activation MiB | saved (hooks) MiB | vs AC none "
            "| RSS Δ MiB | step s | vs AC none |")
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['strategy']}{' ×' + str(r['ranks']) if r['ranks'] > 1 else ''} | {r['ac']} "
                     f"| {r['state_mib']:.1f} | {fmt(r['state_vs_ddp'], '.3f')} | {r['activation_mib']:.1f} "
                     f"| {r['saved_hooks_mib']:.1f} | {fmt(r['act_vs_none'], '.3f')} | {r['rss_delta_mib']:.0f} "
                     f"| {fmt(r['step_time_s'], '.3f')} | {fmt(r['time_vs_none'], '.2f')} |")
    return "\n".join(lines)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2, help="micro-batch (sequences) per rank")
    p.add_argument("--steps", type=int, default=5, help="timed rounds (one step per AC mode each); median reported")
    p.add_argument("--warmup", type=int, default=MIN_WARMUP, help=f"untimed steps first (at least {MIN_WARMUP})")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="fp32", help="train.dtype: fp32 | bf16 | fp16 | auto")
    p.add_argument("--nproc", type=int, default=2, help="ranks for ddp and fsdp")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1, help="CPU threads shared by the ranks")
    p.add_argument("--strategies", default=",".join(STRATEGIES))
    p.add_argument("--acs", default=",".join(AC_MODES))
    p.add_argument("--no-timing", action="store_true", help="memory only")
    p.add_argument("--out", default="", help="write the rows, goals and raw per-rank records here (JSON)")
    # internal: one worker in this process (memory: one AC mode; time: every AC mode of one strategy)
    p.add_argument("--worker", choices=("memory", "time"), help=argparse.SUPPRESS)
    p.add_argument("--worker-dir", default="", help=argparse.SUPPRESS)
    p.add_argument("--strategy", default="single", help=argparse.SUPPRESS)
    p.add_argument("--ac", default="none", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse(argv)
    if a.worker:
        if a.threads:
            torch.set_num_threads(a.threads)
        rec = measure_memory(a) if a.worker == "memory" else measure_time(a)
        Path(a.worker_dir, f"rank{rec['rank']}.json").write_text(json.dumps(rec))
        return
    strategies = [s for s in a.strategies.split(",") if s]
    acs = [x for x in a.acs.split(",") if x]
    for x in acs:
        if x not in AC_MODES:
            raise SystemExit(f"--acs: {x!r} is not one of {', '.join(AC_MODES)}")
    if a.device != "cpu" and torch.cuda.is_available() and torch.cuda.device_count() < a.nproc:
        # NCCL needs one GPU per rank: run the 1-process configurations only, and say so.
        print(f"note: {torch.cuda.device_count()} GPU(s) < --nproc {a.nproc}: only the single-process rows")
        strategies = [s for s in strategies if s == "single"]
    memory: dict[tuple[str, str], list[dict]] = {}
    timing: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for s in strategies:
            for ac in acs:
                t0 = time.perf_counter()
                memory[(s, ac)] = launch("memory", s, ac, a, Path(tmp))
                print(f"  memory {s:6s} {ac:16s} {time.perf_counter() - t0:4.0f} s", flush=True)
            if not a.no_timing:
                t0 = time.perf_counter()
                timing[s] = launch("time", s, "all", a, Path(tmp))
                print(f"  timing {s:6s} {'(interleaved)':16s} {time.perf_counter() - t0:4.0f} s", flush=True)
    rows, goals = summarise(memory, timing)
    r0 = rows[0]
    print(f"\nmodel: {a.layers} layers x {a.width} (heads {a.heads}), seq {a.seq}, vocab {a.vocab}, "
          f"{r0['n_params'] / 1e6:.1f}M params (tied), micro-batch {a.batch}/rank, dtype {a.dtype}, "
          f"device {r0['device']}, total {time.perf_counter() - t_all:.0f} s\n")
    print(table(rows))
    print()
    for name, g in goals.items():
        print(f"{name}: {'MET' if g['met'] else 'NOT MET'}  {json.dumps({k: v for k, v in g.items() if k != 'met'})}")
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        meta = {"args": {k: v for k, v in vars(a).items() if k not in ("worker", "worker_dir", "strategy", "ac",
                                                                       "threads")},
                "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
                "cpu_count": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}
        Path(a.out).write_text(json.dumps({"meta": meta, "rows": rows, "goals": goals, "timing": timing,
                                           "memory": {f"{s}/{ac}": v for (s, ac), v in memory.items()}}, indent=1))
        print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
