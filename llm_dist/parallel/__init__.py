"""Data parallelism (single, DDP, FSDP2, HSDP) and activation checkpointing around the model."""

from llm_dist.parallel.setup import ParallelModel, build_parallel_model, resolve_strategy

__all__ = ["ParallelModel", "build_parallel_model", "resolve_strategy"]
