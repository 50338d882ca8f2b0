"""Training: sharded state, optimizer, checkpoints, metrics and the one train loop."""
