"""llm_dist: distributed LLM training from first principles on torch.distributed."""

__version__ = "0.1.0"
