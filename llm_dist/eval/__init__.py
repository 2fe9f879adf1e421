"""Evaluation: validation loss / perplexity / bits per byte, and multiple-choice accuracy (HellaSwag-style)."""

from llm_dist.eval.lm import LMEval, evaluate_lm, token_byte_lengths
from llm_dist.eval.multiple_choice import MCExample, evaluate_mc, load_mc

__all__ = ["LMEval", "evaluate_lm", "token_byte_lengths", "MCExample", "evaluate_mc", "load_mc"]
