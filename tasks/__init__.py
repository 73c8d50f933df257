"""One module per pipeline stage: a typed `run(...)` core and a `main()` that dvc.yaml calls."""
