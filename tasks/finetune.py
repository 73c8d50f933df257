"""finetune: a classification head on the pretrained trunk, trained on the labeled train split.

The best epoch by validation macro-F1 is kept.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from models.bundle import PAD, encode_texts
from models.checkpoint import load_lm, write_classifier, write_dir_atomically
from models.classifier import ClassifierConfig, TransformerClassifier
from tasks.config import FinetuneConfig, Paths
from tasks.errors import UserError
from tasks.io import read_parquet
from tasks.pretrain import lr_at, optimizer_for
from tasks.tokenize import load_tokenizer
from tasks.tracking import NullTracker, Tracker, stage_main
from tasks.validate import require_passed


def cap_per_label(df: pd.DataFrame, cap: int, seed: int) -> pd.DataFrame:
    """At most `cap` rows per label (seeded sample); 0 keeps everything."""
    if not cap:
        return df
    return df.sample(frac=1.0, random_state=seed).groupby("label").head(cap).sort_index()


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> float:
    from sklearn.metrics import f1_score

    return float(f1_score(y_true, y_pred, labels=list(range(n_classes)), average="macro", zero_division=0))


@torch.no_grad()
def predict(model: torch.nn.Module, ids: torch.Tensor, lengths: torch.Tensor, batch_size: int) -> np.ndarray:
    model.eval()
    preds = [model(ids[i : i + batch_size], lengths[i : i + batch_size]).argmax(-1) for i in range(0, len(ids), batch_size)]
    model.train()
    return torch.cat(preds).numpy()


@dataclass
class FinetuneResult:
    train_examples: int
    best_epoch: int
    val_accuracy: float
    val_macro_f1: float
    train_seconds: float

    @property
    def metrics(self) -> dict:
        return self.__dict__.copy()


def run(cfg: FinetuneConfig, paths: Paths, tracker: Tracker | None = None) -> FinetuneResult:
    from tqdm import tqdm

    tracker = tracker or NullTracker()
    require_passed(paths)
    lm = load_lm(paths.lm)
    if cfg.max_length > lm.config.block_size:
        raise UserError(f"params.yaml: finetune.max_length: {cfg.max_length} exceeds the LM block_size {lm.config.block_size}")
    tok = load_tokenizer(paths.tokenizer)
    pad_id = tok.token_to_id(PAD)
    data = read_parquet(paths.clean_labeled, ["text", "label", "split"])
    labels = sorted(data.loc[data["split"] == "train", "label"].unique())
    index = {lab: i for i, lab in enumerate(labels)}
    train = cap_per_label(data[data["split"] == "train"], cfg.max_train_per_label, cfg.seed)
    val = data[(data["split"] == "val") & data["label"].isin(index)]
    if val.empty:
        raise UserError(f"{paths.clean_labeled}: no validation rows with a training label")

    x_train, len_train = encode_texts(tok, train["text"].tolist(), cfg.max_length, pad_id)
    y_train = torch.tensor(train["label"].map(index).to_numpy())
    x_val, len_val = encode_texts(tok, val["text"].tolist(), cfg.max_length, pad_id)
    y_val = val["label"].map(index).to_numpy()

    torch.manual_seed(cfg.seed)
    model = TransformerClassifier(ClassifierConfig(trunk=lm.config, labels=labels, pooling=cfg.pooling))
    model.trunk.load_state_dict(lm.state_dict())
    model.train()
    opt = optimizer_for(model, cfg.lr, cfg.weight_decay)
    steps_per_epoch = (len(train) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    gen = torch.Generator().manual_seed(cfg.seed)
    best = {"f1": -1.0, "acc": 0.0, "epoch": 0, "state": None}
    history = []
    start = time.perf_counter()
    bar = tqdm(total=total, desc="finetune", unit="step", dynamic_ncols=True)
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        order = torch.randperm(len(train), generator=gen)
        for i in range(0, len(order), cfg.batch_size):
            b = order[i : i + cfg.batch_size]
            T = int(len_train[b].max())
            lr = lr_at(step, total, cfg.lr, cfg.lr * 0.1, cfg.warmup_steps)
            for g in opt.param_groups:
                g["lr"] = lr
            t0 = time.perf_counter()
            loss = F.cross_entropy(model(x_train[b, :T], len_train[b]), y_train[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            tps = int(len_train[b].sum()) / (time.perf_counter() - t0)
            if step % 10 == 0:
                tracker.log_metrics({"train_loss": loss.item(), "lr": lr, "tokens_per_s": tps}, step=step)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}", tok_s=f"{tps:,.0f}", refresh=False)
            bar.update()
            step += 1
        pred = predict(model, x_val, len_val, 128)
        acc, f1 = float((pred == y_val).mean()), macro_f1(y_val, pred, len(labels))
        history.append({"epoch": epoch, "val_accuracy": acc, "val_macro_f1": f1})
        tracker.log_metrics({"val_accuracy": acc, "val_macro_f1": f1}, step=step)
        bar.write(f"epoch {epoch}: val accuracy {acc:.3f}, macro-F1 {f1:.3f}")
        if f1 > best["f1"]:
            best = {"f1": f1, "acc": acc, "epoch": epoch, "state": {k: v.clone() for k, v in model.state_dict().items()}}
    bar.close()
    seconds = time.perf_counter() - start
    model.load_state_dict(best["state"])

    def fill(d: Path) -> None:
        write_classifier(model, d, extra={"max_length": cfg.max_length, "train_config": cfg.model_dump(mode="json")})
        (d / "history.json").write_text(json.dumps(history))

    write_dir_atomically(paths.classifier, fill)
    return FinetuneResult(
        train_examples=len(train),
        best_epoch=best["epoch"],
        val_accuracy=round(best["acc"], 4),
        val_macro_f1=round(best["f1"], 4),
        train_seconds=round(seconds, 2),
    )


def main() -> None:
    stage_main("finetune", lambda p, t: run(p.finetune, p.paths, t).metrics)


if __name__ == "__main__":
    main()
