"""Offline sharders: manifests -> transcoded WebDataset tar shards with stats and a zstd index."""
