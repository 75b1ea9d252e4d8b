"""The one training loop and its side effects: sharding, checkpoints, logging."""
