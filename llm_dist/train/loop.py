"""The training loop around `Trainer.train_step`: logging, evaluation, samples, checkpoints, stopping.

Every stage (pretraining, SFT, reward modelling) runs this same loop with its own data source and hooks.
Order within a step: train step -> log -> evaluate -> sample -> checkpoint, so a checkpoint at step k
holds exactly the state after k optimizer steps and a resumed run continues with step k+1.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence

from llm_dist.train.logger import MetricsLogger
from llm_dist.train.optim import batch_size_at
from llm_dist.train.profiler import StepProfiler
from llm_dist.train.progress import Progress
from llm_dist.train.throughput import Throughput, memory_gib
from llm_dist.train.trainer import Batch, Trainer


class BatchSource(Protocol):
    """What the loop needs from a data loader."""

    def next_batch(self) -> Sequence[Batch]: ...
    def set_global_batch(self, global_batch: int) -> None: ...
    def state_dict(self) -> dict: ...


def _due(step: int, interval: int) -> bool:
    return interval > 0 and step % interval == 0


def fit(
    trainer: Trainer,
    data: BatchSource,
    *,
    logger: MetricsLogger,
    throughput: Throughput,
    save_checkpoint: Callable[[], None] | None = None,
    poll: Callable[[], None] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    sample: Callable[[], str] | None = None,
    seq_len: int = 0,
    stop_at: int | None = None,
    profiler: StepProfiler | None = None,
) -> str:
    """Train until `train.max_steps` (or `stop_at`, or a signal). Returns "finished" or "stopped".

    `save_checkpoint()` writes a checkpoint of the current state (collective); `evaluate()` returns
    metrics such as {"val/loss": ...}; `sample()` returns text to print and log (JSONL / TensorBoard /
    wandb); `poll()` runs after every step (it finalises a finished background checkpoint write);
    `profiler.step()` marks the end of each step for the torch.profiler window.
    """
    cfg = trainer.cfg
    t, ev = cfg.train, cfg.eval
    quantum = trainer.rt.world_size * t.micro_batch_size
    last_saved = trainer.state.step
    reason = "finished"
    logger.set_total(t.max_steps)
    progress = Progress(t.max_steps, start_step=trainer.state.step)
    with trainer.stop:
        throughput.resume()
        while trainer.state.step < t.max_steps:
            if t.batch_ramp_tokens:
                data.set_global_batch(batch_size_at(trainer.state.tokens_seen, t, seq_len, quantum))
            metrics = trainer.train_step(data.next_batch())
            step = trainer.state.step
            if poll is not None:
                poll()
            throughput.step(metrics.pop("tokens"))
            if profiler is not None:
                profiler.step()
            done = step >= t.max_steps
            stopping = trainer.should_stop() or (stop_at is not None and step >= stop_at)
            timing = progress.fields(step)  # elapsed_s, eta_s
            if step == 1 or _due(step, t.log_interval) or done or stopping:
                logger.log(step, {**metrics, **throughput.report(), "mem_gib": memory_gib(trainer.rt.device),
                                  **timing})
            else:
                logger.progress(step, timing["elapsed_s"], timing["eta_s"],
                                timing["elapsed_s"] / max(step - progress.start_step, 1))
            paused = False
            if evaluate is not None and (_due(step, ev.interval) or done):
                logger.clear_progress()  # the evaluation may print (every rank's code, not the logger's)
                logger.log(step, evaluate(), prefix="eval  ")
                paused = True
            if sample is not None and (_due(step, ev.sample_interval) or (done and ev.sample_tokens)):
                logger.text(step, "sample", sample())  # printed by the console sink, logged by the others
                paused = True
            if save_checkpoint is not None and (_due(step, cfg.checkpoint.interval) or done or stopping):
                logger.clear_progress()  # the checkpoint manager prints its own lines
                save_checkpoint()
                last_saved = step
                paused = True
            if paused:
                throughput.resume()
            if stopping:
                reason = "stopped"
                break
    if save_checkpoint is not None and last_saved != trainer.state.step:
        save_checkpoint()
    return reason
