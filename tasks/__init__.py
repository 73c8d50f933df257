"""The DVC stages, one module each (`python -m tasks.<stage>`): a typed `run(...)` and a `main()`.

Stages import `tasks.shared` (plumbing) and `models`, never each other; `tasks.ops` holds the
operations (CLI, promote, rollback, checks), which no stage imports.
"""
