"""`compress:` — int8 quantization of the fine-tuned classifier."""

from __future__ import annotations

from tasks.shared.config.base import Section


class CompressConfig(Section):
    """int8 dynamic quantization of the fine-tuned classifier."""

    per_channel: bool = True
    """One scale per output channel (more accurate) instead of one per tensor."""
