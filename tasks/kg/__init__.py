"""The knowledge-graph task: entity recognition, relation extraction and entity linking from docstrings, and the
graph built from them (see docs/kg.md)."""
