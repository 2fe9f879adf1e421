"""Hugging Face interop: export runs to HF folders and import HF folders (weights + tokenizer)."""
