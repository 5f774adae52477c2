"""The engine-free writing core: encode, pool, tar, keys, rows -> shards, ImageWriterStage."""
