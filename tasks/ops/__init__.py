"""Operations, not DVC stages: the `lmforge` CLI, promotion and rollback (the registry), and the checks
that keep dvc.yaml and dvc.lock true to the code (dag.py)."""
