"""Data: tokenize corpora into memory-mappable shards (prepare) and serve distributed batches (loader).

    from llm_dist.data import ensure_prepared, ShardedLoader
    ensure_prepared("data/prepared/shakespeare_byte", "data/tinyshakespeare/input.txt", "byte", 0.1)  # rank 0
    loader = ShardedLoader("data/prepared/shakespeare_byte", "train", seq_len=256, global_batch=64,
                           micro_batch=16, rank=rank, world_size=world_size, seed=1337, device=device)
    for x, y in loader.next_batch(): ...

Inputs: parquet, Arrow/`datasets` folders, JSONL(.gz/.zst), text; weighted mixtures via prepare_mixture.
Formats and rules are documented in docs/data.md.
"""

from __future__ import annotations

from llm_dist.data.index import (
    INDEX_NAME,
    DataIndexError,
    ShardWriter,
    dtype_for_vocab,
    make_index,
    read_index,
    write_index,
    write_token_dataset,
)
from llm_dist.data.loader import ShardedLoader, TokenStream
from llm_dist.data.mixture import MixtureSource, read_mixture_file
from llm_dist.data.prepare import (
    DEFAULT_SHARD_TOKENS,
    char_split_point,
    ensure_prepared,
    prepare_dataset,
    prepare_mixture,
    use_or_prepare,
    val_by_hash,
)
from llm_dist.data.sources import DataPrepError, resolve_sources

__all__ = [
    "INDEX_NAME",
    "DEFAULT_SHARD_TOKENS",
    "DataIndexError",
    "DataPrepError",
    "ShardWriter",
    "ShardedLoader",
    "TokenStream",
    "char_split_point",
    "dtype_for_vocab",
    "ensure_prepared",
    "make_index",
    "MixtureSource",
    "prepare_dataset",
    "prepare_mixture",
    "read_mixture_file",
    "read_index",
    "resolve_sources",
    "use_or_prepare",
    "val_by_hash",
    "write_index",
    "write_token_dataset",
]
