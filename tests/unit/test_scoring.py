"""evaluate's scoring helpers (tasks/shared/scoring.py) on a stand-in model."""

from __future__ import annotations

import numpy as np

from tasks.shared.scoring import Scorer


def test_probabilities_come_back_in_the_texts_order_from_batches_of_like_length():
    """Texts are scored shortest first (little padding per batch) and the rows return in the caller's order."""
    batches: list[list[int]] = []

    def encode(texts: list[str]) -> list[int]:
        batches.append([len(t) for t in texts])
        return [len(t) for t in texts]

    def forward(lengths: list[int]) -> np.ndarray:  # the probability of class "a" tells the text's length apart
        p = np.array([n / 100 for n in lengths], dtype=np.float32)
        return np.stack([p, 1 - p], axis=1)

    scorer = Scorer(["a", "b"], encode, forward)
    texts = ["x" * n for n in (40, 3, 25, 7, 33, 3, 12)]
    probs = scorer.probabilities(texts, batch_size=3)
    np.testing.assert_allclose(probs[:, 0], [len(t) / 100 for t in texts], rtol=1e-6)
    assert batches == [[3, 3, 7], [12, 25, 33], [40]]
    assert scorer.predict(texts, 3) == ["b"] * len(texts)
    assert scorer.probabilities([], 3).shape == (0, 2)
