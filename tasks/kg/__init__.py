"""The knowledge-graph task: entity recognition, relation extraction and entity linking over docstrings."""
