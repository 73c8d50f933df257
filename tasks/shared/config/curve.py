"""`curve:` — the learning curve: test scores against labeled examples per label, pretrained vs from scratch."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.shared.config.base import Section

CurveModel = Literal["pretrained", "scratch", "cnn", "tfidf"]


class CurveConfig(Section):
    """The learning curve (curve/dvc.yaml, outside the default pipeline): each model trained on k examples per
    label, several seeds each, all scored on the same test rows. The Transformers and the CNN train with
    finetune's recipe (`finetune:`), TF-IDF as evaluate fits it (`evaluate.tfidf_*`)."""

    per_label: list[int] = Field(default_factory=lambda: [8, 32, 128, 0], min_length=1)
    """Training examples per label, each a seeded sample of the train split; 0 = every one (a label with fewer
    than k keeps all it has)."""
    seeds: list[int] = Field(default_factory=lambda: [1337, 1338, 1339], min_length=1)
    """One run per seed and k: the seed draws the sample, the initial weights and the batch order."""
    models: list[CurveModel] = Field(default_factory=lambda: ["pretrained", "scratch", "cnn", "tfidf"])
    """`pretrained` (a head on paths.lm, finetune's recipe), `scratch` (the same Transformer, random init),
    `cnn` (finetune's CNN baseline and its recipe), `tfidf` (TF-IDF + logistic regression)."""
    min_steps: int = Field(100, ge=0)
    """Fewest optimizer steps a neural run takes: with few examples, epochs are added until the run reaches
    it (the schedule's warmup and decay stretch with it); a run with more steps keeps its recipe's epochs."""
    cap_validation: bool = True
    """Select the best epoch on k validation examples per label too (true few-shot: nobody with 8 labels per
    class has hundreds more to validate on); false = the whole validation split."""
    bootstrap_resamples: int = Field(1000, ge=100)
    """Resamples of the test rows behind every interval and p-value (paired: the same for every model and seed)."""
    seed: int = 1337
    """Seeds the bootstrap resamples."""

    @model_validator(mode="after")
    def _check_curve(self) -> "CurveConfig":
        for name in ("per_label", "seeds", "models"):
            values = getattr(self, name)
            if len(set(values)) != len(values):
                raise ValueError(f"{name}: each value at most once (got {values})")
        if min(self.per_label) < 0:
            raise ValueError(f"per_label: counts must be >= 0 (got {self.per_label})")
        if "pretrained" not in self.models:
            raise ValueError(f"models: the curve compares `pretrained` with the others (got {self.models})")
        return self
