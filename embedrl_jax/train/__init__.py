"""Training: optimizer and state, checkpoints, metrics, and the trainers."""
