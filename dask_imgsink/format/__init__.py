"""The on-disk dataset: file names, shard schema, index, card and checksums."""
