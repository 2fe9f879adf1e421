"""Hugging Face Hub folders: export an llm_dist run/checkpoint to a folder `transformers` loads as is."""
