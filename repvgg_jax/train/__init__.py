"""Training: the trainer (``train.train_and_evaluate``) and its state, optimizer, sharding,
checkpoints, steps, QAT, export and report."""
