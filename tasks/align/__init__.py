"""Task `align`: CLIP-style contrastive alignment of natural language and code (a dual encoder, a vector index,
retrieval and zero-shot labels) on the shared pretrained trunk."""
