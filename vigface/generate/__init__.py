"""Dataset generation: sharded, resumable, atomic shard files, manifest."""
