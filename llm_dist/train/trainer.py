"""The trainer core every stage shares: one readable `train_step`, evaluation, and the resumable state.

A step takes this rank's micro-batches of one global batch and
  1. counts the target tokens of the *whole* global batch (one all-reduce, before any forward),
  2. runs forward/backward per micro-batch with DDP's gradient sync skipped on all but the last,
     each micro-batch's summed loss scaled by world_size / global_target_tokens, so the gradient is
     exactly d(mean loss over every target token in the global batch) however the batch is split,
  3. unscales (fp16), clips the global gradient norm, sets the scheduled lr and steps AdamW.
Stages plug in their loss with `loss_fn(model, batch) -> (sum of per-token losses, number of targets)`.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from llm_dist import distributed as D
from llm_dist.config import Config
from llm_dist.distributed import Runtime
from llm_dist.train.optim import build_optimizer, lr_at

IGNORE_INDEX = -100  # targets with this id carry no loss (padding, prompt tokens in SFT)

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over targets != IGNORE_INDEX, and the number of such targets."""
    x, y = batch[0], batch[1]  # (B, T), (B, T)
    logits = model(x)  # (B, T, V_padded)
    # fp32 log-softmax: bf16 logits lose ~3 significant digits, which shows up directly in the loss.
    loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, (y != IGNORE_INDEX).sum()


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype -> the autocast dtype (fp32 = no autocast). auto: bf16 on a CUDA GPU that has it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class TrainState:
    """Counters that resume with the run."""

    step: int = 0  # optimizer steps completed
    tokens_seen: int = 0  # input tokens consumed by all ranks
    target_tokens_seen: int = 0  # tokens that carried loss, all ranks


class StopRequest:
    """SIGINT/SIGTERM/SIGUSR1 set a flag; the loop finishes its step, all ranks agree, save, exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame) -> None:  # noqa: ANN001
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C stops at once
        self.signum = signum
        D.print0(f"\nreceived {signal.Signals(signum).name}: finishing this step, then saving a checkpoint")

    def __enter__(self) -> "StopRequest":
        for s in self.SIGNALS:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handlers
                pass
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h)


class Trainer:
    """Model (+ DDP / compile wrappers), optimizer, grad scaler and counters, with `train_step`."""

    def __init__(self, cfg: Config, rt: Runtime, model: nn.Module, loss_fn: LossFn = causal_lm_loss) -> None:
        self.cfg, self.rt, self.loss_fn = cfg, rt, loss_fn
        self.raw_model = model  # unwrapped: state dicts come from here, free of `module.`/`_orig_mod.`
        self.amp_dtype = resolve_dtype(cfg.train.dtype, rt.device)
        if rt.device.type == "cuda":
            # TF32 matmuls: ~8x the fp32 throughput on Ampere+ at a precision that does not hurt training.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        if cfg.train.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        self.forward_model = torch.compile(model, mode=cfg.train.compile_mode) if cfg.train.compile else model
        self.ddp = rt.world_size > 1
        self.model: nn.Module = (
            DDP(self.forward_model, device_ids=[rt.device.index] if rt.device.type == "cuda" else None,
                bucket_cap_mb=cfg.parallel.ddp_bucket_mb)
            if self.ddp else self.forward_model
        )
        self.optimizer = build_optimizer(model, cfg.optim, rt.device)
        # fp16 needs loss scaling (its 5-bit exponent underflows small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(rt.device.type) if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        self.stop = StopRequest()
        self.stop_agreed = False

    # ------------------------------------------------------------------------------------------- step
    def autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.rt.device.type, dtype=self.amp_dtype)

    def lr(self) -> float:
        return lr_at(self.state.step, self.cfg.optim, self.cfg.train.max_steps)

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches. Returns metrics (global, synchronised)."""
        self.model.train()
        dev = self.rt.device
        # Global target count, token count and stop flag in one all-reduce. Summing before the forward
        # lets every micro-batch be scaled by the same constant, so no rank or micro-batch is over-weighted.
        local = [torch.stack([(mb[1] != IGNORE_INDEX).sum(), torch.tensor(mb[0].numel(), device=mb[0].device)])
                 for mb in micro_batches]
        counts = torch.cat([torch.stack(local).sum(0).to(dev, torch.float64),
                            torch.tensor([float(self.stop.signum is not None)], dtype=torch.float64, device=dev)])
        D.all_reduce_sum(counts)
        n_global, tokens, stop_votes = (int(v) for v in counts.tolist())  # the step's one host sync
        if n_global == 0:
            raise RuntimeError(f"step {self.state.step}: the global batch has no target tokens")
        scale = self.rt.world_size / n_global  # DDP averages gradients over ranks; undo that into a sum

        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        for i, mb in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            # Skip DDP's all-reduce on all but the last micro-batch: gradients accumulate locally.
            sync = contextlib.nullcontext() if (last or not self.ddp) else self.model.no_sync()
            with sync:
                with self.autocast():
                    mb_loss, _ = self.loss_fn(self.model, mb)
                loss = mb_loss * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += mb_loss.detach().float()

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip, foreach=True)
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step if any gradient is inf/nan
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

        D.all_reduce_sum(loss_sum)
        loss = loss_sum.item() / n_global
        if self.cfg.train.detect_anomaly and not math.isfinite(loss):
            raise FloatingPointError(f"step {self.state.step}: loss is {loss} (train.detect_anomaly)")
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.target_tokens_seen += n_global
        # Only the all-reduced vote decides: a signal that lands after this step's all-reduce is counted
        # in the next step's, so every rank stops after the same step.
        self.stop_agreed = stop_votes > 0
        return {"loss": loss, "lr": lr, "grad_norm": float(grad_norm), "tokens": tokens}

    def should_stop(self) -> bool:
        """True when any rank had been signalled before the last step's all-reduce (same on every rank)."""
        return self.stop_agreed

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: Sequence[Sequence[Batch]]) -> float:
        """Mean loss over every target token of the given global batches (this rank's parts), all ranks."""
        self.forward_model.eval()
        totals = torch.zeros(2, device=self.rt.device, dtype=torch.float64)
        for micro_batches in batches:
            for mb in micro_batches:
                with self.autocast():
                    loss, n = self.loss_fn(self.forward_model, mb)
                totals[0] += loss.double()
                totals[1] += n
        D.all_reduce_sum(totals)
        self.forward_model.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    # --------------------------------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        return {
            "model": self.raw_model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler else {},
            "train": asdict(self.state),
        }

    def load_state_dict(self, sd: dict) -> None:
        self.raw_model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        if self.scaler and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
        self.state = TrainState(**sd["train"])
