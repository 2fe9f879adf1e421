"""Supervised fine-tuning: chat template and data formats, packing with per-example attention, the stage."""
