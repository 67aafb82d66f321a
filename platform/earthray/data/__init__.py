"""Data: ingest (scenes -> chips -> Parquet shards + manifest), shard schema, statistics."""
