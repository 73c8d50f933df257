"""Training data: memory-mapped token-id shards sampled as random windows, causal and masked-LM batches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tasks.shared.errors import UserError
from tasks.shared.shards import open_shards, shard_files


class TokenShards:
    """Memory-mapped token-id shards (`<split>-*.bin` or `<split>.bin`) sampled as random windows.

    All ranks draw the same global batch from the same generator and each takes its rows, so a
    run's data order does not depend on the number of processes.
    """

    def __init__(self, folder: Path, split: str) -> None:
        self.shards = open_shards(folder, split)
        self.files = shard_files(folder, split)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def windows(self, n: int, length: int, gen: torch.Generator) -> torch.Tensor:
        """`n` random windows of `length` consecutive ids (n, length) as int64, one gather per shard."""
        room = np.array([max(0, len(s) - length) for s in self.shards])
        if room.sum() <= 0:
            raise UserError(f"{self.files[0].parent}: shards hold fewer than {length + 1} tokens")
        flat = torch.randint(int(room.sum()), (n,), generator=gen).numpy()
        shard = np.searchsorted(np.cumsum(room), flat, side="right")
        start = flat - np.concatenate([[0], np.cumsum(room)[:-1]])[shard]
        out = np.empty((n, length), dtype=np.int64)
        offsets = np.arange(length)
        for i in np.unique(shard):
            rows = shard == i
            out[rows] = self.shards[i][start[rows, None] + offsets]
        return torch.from_numpy(out)


def causal_batch(data: TokenShards, n: int, block: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs (n, T) and next-token targets (n, T)."""
    w = data.windows(n, block + 1, gen)
    return w[:, :-1], w[:, 1:]


def mlm_batch(
    data: TokenShards,
    n: int,
    block: int,
    gen: torch.Generator,
    mask_id: int,
    vocab: int,
    prob: float,
    special: list[int],
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking: `prob` of the tokens become targets; of those 80% -> mask, 10% -> random, 10% kept."""
    x = data.windows(n, block, gen)
    chosen = torch.rand(x.shape, generator=gen) < prob
    for sid in special:
        chosen &= x != sid
    y = torch.where(chosen, x, torch.full_like(x, -1))
    r = torch.rand(x.shape, generator=gen)
    x = torch.where(chosen & (r < 0.8), torch.full_like(x, mask_id), x)
    random_ids = torch.randint(vocab, x.shape, generator=gen)
    x = torch.where(chosen & (r >= 0.8) & (r < 0.9), random_ids, x)
    return x, y
