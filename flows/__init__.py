"""Prefect flows: orchestration only (stage order, concurrency, promotion); no tensor code."""
