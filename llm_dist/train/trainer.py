"""The trainer core every stage shares: one readable `train_step`, evaluation, and the resumable state.

A step takes this rank's micro-batches of one global batch and
  1. counts the target tokens of the *whole* global batch (one all-reduce, before any forward, whose result
     stays on the device: the host goes straight on to launching the forward),
  2. runs forward/backward per micro-batch with gradient sync (DDP all-reduce, FSDP reduce-scatter)
     skipped on all but the last, each micro-batch's summed loss scaled by
     world_size / global_target_tokens, so the gradient is exactly d(mean loss over every target token in
     the global batch) however the batch is split over ranks and micro-batches,
  3. checks loss and gradient norm are finite (else skips the update or halts, `train.nonfinite`),
     unscales (fp16), clips the global gradient norm (sharded-aware), sets the scheduled lr, steps AdamW.
The step has one host sync: after backward and clipping, loss, gradient norm, target/token counts and the
stop vote come to the host together (the finiteness check needs them before the optimizer step).
Stages plug in their loss with `loss_fn(model, batch) -> (sum of per-token losses, number of targets)`.
A loss that keeps statistics may also define `reset_stats()` (called before the step's micro-batches) and
`step_stats(device) -> dict` (after them, on every rank: it may all-reduce), merged into the step's metrics.
"""

from __future__ import annotations

import contextlib
import math
import signal
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor

from llm_dist import distributed as D
from llm_dist.config import Config
from llm_dist.distributed import Runtime
from llm_dist.model.moe import moe_aux_loss
from llm_dist.parallel import ParallelModel
from llm_dist.train.optim import build_optimizer, clip_grad_norm, lr_at

IGNORE_INDEX = -100  # targets with this id carry no loss (padding, prompt tokens in SFT)

Batch = Sequence[torch.Tensor]
LossFn = Callable[[nn.Module, Batch], tuple[torch.Tensor, torch.Tensor]]


def causal_lm_loss(model: nn.Module, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy summed over targets != IGNORE_INDEX, and the number of such targets.

    The model computes the loss itself (`Transformer.forward(x, targets=y)` -> `lm_loss`, per `loss.impl`),
    so a compiled model compiles the loss with its forward and no fp32 logits tensor is written eagerly.
    MoE models (training mode only) add their auxiliary loss `aux` (load balance + z-loss, already
    weighted by its coefficients) as aux * n, n = this micro-batch's targets. The trainer divides the
    summed loss by the global target count N, so the objective becomes mean CE + sum_mb (n_mb / N) * aux_mb:
    each micro-batch's aux loss weighted like its tokens, which is aux itself when there is one micro-batch.
    """
    x, y = batch[0], batch[1]  # (B, T), (B, T)
    loss = model(x, targets=y, ignore_index=IGNORE_INDEX)  # () fp32, summed over kept targets
    n = (y != IGNORE_INDEX).sum()
    aux = moe_aux_loss(model) if model.training else None
    if aux is not None:
        loss = loss + aux * n
    return loss, n


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """train.dtype -> the autocast dtype (fp32 = no autocast). auto: bf16 on a CUDA GPU that has it."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


@dataclass
class TrainState:
    """Counters that resume with the run."""

    step: int = 0  # optimizer steps completed (skipped non-finite steps count: their data was consumed)
    tokens_seen: int = 0  # input tokens consumed by all ranks
    target_tokens_seen: int = 0  # tokens that carried loss, all ranks
    skipped_steps: int = 0  # steps whose update was dropped because loss or gradients were not finite
    consecutive_skips: int = 0  # current run of skipped steps (halts at train.max_skipped_steps)


class NonFiniteError(FloatingPointError):
    """Training stopped on a NaN/Inf loss or gradient (the last good checkpoint is left untouched)."""


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
    """Model (as built by `build_parallel_model`), optimizer, grad scaler and counters, with `train_step`."""

    def __init__(self, cfg: Config, rt: Runtime, pm: ParallelModel, loss_fn: LossFn = causal_lm_loss,
                 amp_dtype: torch.dtype | None = None) -> None:
        self.cfg, self.rt, self.pm, self.loss_fn = cfg, rt, pm, loss_fn
        self.raw_model = pm.model  # bare model: generation, and (under FSDP) also the training module
        self.model = pm.module  # what forward/backward run through (DDP wrapper, FSDP module, or bare)
        self.amp_dtype = amp_dtype if amp_dtype is not None else resolve_dtype(cfg.train.dtype, rt.device)
        if rt.device.type == "cuda":
            # TF32 matmuls: ~8x the fp32 throughput on Ampere+ at a precision that does not hurt training.
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        if cfg.train.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=False)
        if cfg.train.detect_anomaly:
            torch.autograd.set_detect_anomaly(True)
        self.optimizer = build_optimizer(pm.model, cfg.optim, rt.device)
        # fp16 needs loss scaling (its 5-bit exponent underflows small gradients); bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler(rt.device.type) if self.amp_dtype == torch.float16 else None
        self.state = TrainState()
        self.stop = StopRequest()
        self.stop_agreed = False
        # Called right before parameters/optimizer state change (e.g. wait for an async checkpoint's copy).
        self.pre_step_hooks: list[Callable[[], None]] = []
        # LoRA: {url, fingerprint} of the frozen base, recorded in every checkpoint's meta.json (set on opening).
        self.lora_base: dict | None = None

    # ------------------------------------------------------------------------------------------- step
    def autocast(self) -> contextlib.AbstractContextManager:
        # Under FSDP the mixed-precision policy casts the gathered parameters instead.
        if self.amp_dtype == torch.float32 or self.pm.sharded:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.rt.device.type, dtype=self.amp_dtype)

    def lr(self) -> float:
        return lr_at(self.state.step, self.cfg.optim, self.cfg.train.max_steps)

    def _grad_sync(self, enabled: bool) -> contextlib.AbstractContextManager:
        """Gradient communication only on the last micro-batch: locally accumulated until then."""
        if self.pm.strategy == "ddp" and not enabled:
            return self.model.no_sync()
        if self.pm.sharded:
            self.model.set_requires_gradient_sync(enabled)
        return contextlib.nullcontext()

    def _local_counts(self, micro_batches: Sequence[Batch]) -> torch.Tensor:
        """(targets, tokens, stop vote) of this rank's micro-batches as a (3,) float64 device tensor.

        Built without a host sync: the target count is a device reduction, and the host-known numbers go in
        through `torch.full` (a fill kernel; `torch.tensor(x, device="cuda")` would copy from pageable
        memory and synchronise the stream). float64 counts are exact up to 2**53 tokens.
        """
        dev = self.rt.device
        targets = torch.stack([(mb[1] != IGNORE_INDEX).sum() for mb in micro_batches]).sum()  # () int64
        tokens = float(sum(mb[0].numel() for mb in micro_batches))  # shapes are host metadata: no sync
        vote = float(self.stop.signum is not None)
        return torch.stack([targets.to(dev, torch.float64),
                            torch.full((), tokens, dtype=torch.float64, device=dev),
                            torch.full((), vote, dtype=torch.float64, device=dev)])  # (3,)

    def train_step(self, micro_batches: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches. Returns metrics (global, synchronised).

        One host sync per step (`.tolist()` after clipping); none before the forward.
        """
        self.model.train()
        dev = self.rt.device
        # Global target count, token count and stop flag in one all-reduce. Summing before the forward
        # lets every micro-batch be scaled by the same constant, so no rank or micro-batch is over-weighted.
        counts = D.all_reduce_sum(self._local_counts(micro_batches))  # (3,) float64, stays on the device
        # DDP/FSDP average gradients over ranks; world_size / N undoes that into a sum. A device scalar:
        # rounded to fp32 as the Python float was, so the numerics match a host-side scale bit for bit.
        # N = 0 makes it inf; that is caught (and raised) after the sync below, before any update.
        scale = (self.rt.world_size / counts[0]).float()  # () fp32

        if hasattr(self.loss_fn, "reset_stats"):
            self.loss_fn.reset_stats()
        loss_sum = torch.zeros((), device=dev, dtype=torch.float32)
        for i, mb in enumerate(micro_batches):
            with self._grad_sync(i == len(micro_batches) - 1):
                with self.autocast():
                    mb_loss, _ = self.loss_fn(self.model, mb)
                loss = mb_loss * scale
                (self.scaler.scale(loss) if self.scaler else loss).backward()
            loss_sum += mb_loss.detach().float()

        if self.scaler:
            self.scaler.unscale_(self.optimizer)
        clip = self.cfg.train.grad_clip if self.cfg.train.grad_clip > 0 else math.inf
        grad_norm = clip_grad_norm(self.raw_model, clip)  # torch's, or the hand-written one (model.ops=scratch)
        if isinstance(grad_norm, DTensor):  # sharded grads: the norm over every shard of every rank
            grad_norm = grad_norm.full_tensor()
        D.all_reduce_sum(loss_sum)
        # The step's one host sync: everything the host needs (finiteness, counters, the stop vote, the
        # model's routing statistics) in one float64 vector. fp32 -> float64 is exact, so the values equal
        # what separate .item() calls would give.
        extra = self.raw_model.extra_metric_tensor() if hasattr(self.raw_model, "extra_metric_tensor") else None
        # grad_norm may live elsewhere (CPU offload, or a CPU zero when no parameter has a gradient)
        host = torch.cat([torch.stack([loss_sum.double(), grad_norm.to(loss_sum.device).double()]), counts,
                          *([extra[1].double()] if extra is not None else [])]).tolist()
        loss_val, norm_val = host[0], host[1]
        n_global, tokens, stop_votes = (int(v) for v in host[2:5])
        if n_global == 0:
            self.optimizer.zero_grad(set_to_none=True)  # the gradients of a 1/0-scaled loss: drop them
            raise RuntimeError(f"step {self.state.step}: the global batch has no target tokens")
        loss_val /= n_global
        lr = self.lr()
        # Only the all-reduced vote decides: a signal that lands after this step's all-reduce is counted
        # in the next step's, so every rank stops after the same step.
        self.stop_agreed = stop_votes > 0
        self.state.step += 1
        self.state.tokens_seen += tokens
        self.state.target_tokens_seen += n_global
        metrics = {"loss": loss_val, "lr": lr, "grad_norm": norm_val, "tokens": tokens}
        if extra is not None:  # MoE routing statistics of this rank's last micro-batch
            metrics.update(zip(extra[0], host[5:]))
        if hasattr(self.loss_fn, "step_stats"):  # the loss's own statistics (collective: every rank calls it)
            metrics.update(self.loss_fn.step_stats(dev))

        # With fp16 an inf gradient norm at a finite loss is the loss scale overflowing: GradScaler skips
        # that step and lowers the scale itself, so it is not a fault.
        if not math.isfinite(loss_val) or (not math.isfinite(norm_val) and self.scaler is None):
            self._on_nonfinite(loss_val)  # raises NonFiniteError when halting
            return {**metrics, "skipped": 1}
        self.state.consecutive_skips = 0
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        for hook in self.pre_step_hooks:
            hook()
        if self.scaler:
            self.scaler.step(self.optimizer)  # skips the step itself if any gradient is inf/nan (fp16: a sync)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return metrics

    def nonfinite_grads(self) -> list[str]:
        """Names of parameters whose gradient has a NaN/Inf on any rank (collective; failure path only)."""
        named = [(n, p) for n, p in self.raw_model.named_parameters() if p.grad is not None]
        flags = torch.tensor([0.0 if torch.isfinite(p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad).all()
                              else 1.0 for _, p in named], device=self.rt.device)
        D.all_reduce_sum(flags)
        return [n.replace("._checkpoint_wrapped_module", "") for (n, _), f in zip(named, flags.tolist()) if f > 0]

    def _on_nonfinite(self, loss: float) -> None:
        """Drop this step's update; say which tensor; halt per `train.nonfinite` / `max_skipped_steps`."""
        bad = self.nonfinite_grads()
        what = f"loss is {loss}" if not math.isfinite(loss) else "loss is finite"
        where = f"non-finite gradients in {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}" if bad else \
            "all gradients finite"
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler:  # close the unscale_ of this step (and back the scale off if grads overflowed)
            self.scaler.update()
        self.state.skipped_steps += 1
        self.state.consecutive_skips += 1
        msg = f"step {self.state.step}: {what}; {where}"
        t = self.cfg.train
        if t.nonfinite == "halt" or self.state.consecutive_skips >= t.max_skipped_steps:
            reason = "train.nonfinite=halt" if t.nonfinite == "halt" else \
                f"{self.state.consecutive_skips} non-finite steps in a row (train.max_skipped_steps)"
            raise NonFiniteError(f"{msg}. Halting ({reason}); the last checkpoint is the last good state.")
        D.warn0(f"{msg}. Update skipped ({self.state.consecutive_skips} in a row, {self.state.skipped_steps} in all).")

    def should_stop(self) -> bool:
        """True when any rank had been signalled before the last step's all-reduce (same on every rank)."""
        return self.stop_agreed

    # ------------------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def evaluate(self, batches: Sequence[Sequence[Batch]]) -> float:
        """Mean loss over every target token of the given global batches (this rank's parts), all ranks."""
        module = self.raw_model  # no DDP hooks needed for a forward; under FSDP this is the sharded module
        module.eval()
        totals = torch.zeros(2, device=self.rt.device, dtype=torch.float64)
        for micro_batches in batches:
            for mb in micro_batches:
                with self.autocast():
                    loss, n = self.loss_fn(module, mb)
                totals[0] += loss.double()
                totals[1] += n
        D.all_reduce_sum(totals)
        module.train()
        return (totals[0] / totals[1].clamp(min=1)).item()

    # --------------------------------------------------------------------------------------- resuming
    def model_optim_state(self) -> dict:
        """Model + optimizer state for DCP (sharded under FSDP, bare parameter names)."""
        from llm_dist.checkpoint.sharded import model_optim_state

        # LoRA: only the parameters that train (adapters) and their optimizer state; the base is referenced.
        return model_optim_state(self.raw_model, self.optimizer, trainable_only=self.cfg.model.lora.rank > 0)

    def train_state(self) -> dict:
        """The small JSON-able part: counters and the grad scaler."""
        return {"trainer": asdict(self.state), "scaler": self.scaler.state_dict() if self.scaler else {}}

    def load_train_state(self, sd: dict) -> None:
        self.state = TrainState(**sd["trainer"])
        if self.scaler and sd.get("scaler"):
            self.scaler.load_state_dict(sd["scaler"])
