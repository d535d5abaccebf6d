"""Dataset plugins: each module registers a loader `fn(cfg) -> Dataset` with @register_dataset."""
