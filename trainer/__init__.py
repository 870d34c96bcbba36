"""What is trained: config, model, data, optimizer, loop, checkpoints, metrics."""
