"""The one training loop and its side effects: checkpoints, EMA, logging, randomness."""
