"""Plumbing the stages share: typed params, the stage harness, the atomic writer, MLflow tracking,
the on-disk contracts between stages (token shards, validation result) and the training engine."""
