"""Data: sources, text shards (parquet), token shards, loaders."""
