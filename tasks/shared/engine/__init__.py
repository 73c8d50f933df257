"""Training engine shared by the training stages, one module per concern; import the module you use.

- `runtime`: devices, processes (torchrun, DDP/FSDP) and precision (the CPU precision probe).
- `optim`: optimizers, parameter groups and learning-rate schedules.
- `step`: the one training step (`train_step`), its timer and throughput accounting.
- `data`: memory-mapped token shards and causal / masked-LM batches.
- `checkpoints`: resumable training checkpoints.

Nothing here knows about a particular stage; `tasks/pretrain.py` and `tasks/shared/classify.py` hold the
loops, and `bench/train_throughput.py` times the same step.
"""
