"""Training: state, optimizer, sharding, checkpoints, steps and the staged pipeline."""
