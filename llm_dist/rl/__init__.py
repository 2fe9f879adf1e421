"""Reinforcement learning on the shared trainer: rollouts gathered across ranks, GRPO, checkable tasks."""
