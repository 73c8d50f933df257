"""The knowledge-graph task: entity recognition, relation extraction and entity linking (KG-SPEC in docs/kg.md)."""
