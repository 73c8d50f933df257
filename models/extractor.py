"""The knowledge-graph extractor: three heads on the pretrained GPT trunk, its on-disk bundle and its inference API.

- a BIO token tagger over the entity labels; character spans come from the tokenizer's offsets;
- a relation classifier over (head representation, tail span representation), where the head is a span or,
  for head = -1, the mean of the whole text (the documented object, the `subject`);
- a linking projection scoring a mention's context vector against each candidate's description vector by dot
  product (candidates = knowledge-base entities with the mention's `name`).

A span is represented by the mean of its token states and, because the trunk is causal, by the state a few tokens
after its end (`right_context`), which has read what follows the span ("ValueError is raised"); the tagger reads
each token with the next one's state.

What the knowledge base says about the text (models/kb_features.py) is input, as in NER systems with gazetteer
features and entity linkers with priors: per-token features (identifier, kinds of the entities named so, one of
the documented object's parameters, in its module or class, ...) are projected and added to the trunk's states;
the linking score adds learned weights on per-candidate features (same module as the subject, train prior, ...);
the relation classifier reads the surface cues around the tail ("Raises X") and the subject's kind.

The bundle folder holds `model.safetensors`, `config.json`, `tokenizer.json`, `entities.parquet` (the KB it links
into), `priors.json` (train link counts of surface strings) and `candidates.safetensors` (the projected description
vector of every entity whose name is shared, so serving never re-encodes the KB). Nothing is unpickled.
"""

from __future__ import annotations

import bisect
import json
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from safetensors.torch import save_file, save_model

from models.checkpoint import CONFIG, WEIGHTS, load_json, load_tensors, load_weights
from models.errors import ArtifactError
from models.files import file_sha256
from models.kb_features import (
    CUES,
    LINK_FEATURES,
    SUBJECT_KINDS,
    TOKEN_FEATURES,
    KnowledgeIndex,
    Subject,
    candidate_name,
    relation_cues,
)
from models.tokenizer import PAD, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, GPTConfig

KIND = "extractor"
"""`kind` in config.json."""
ENTITIES = "entities.parquet"
"""The knowledge base the extractor links into (KG-SPEC's entities table)."""
CANDIDATES = "candidates.safetensors"
"""`vectors` (N, link_dim): projected descriptions; `rows` (N,): their row in entities.parquet."""
NO_RELATION = "none"
"""The relation label of a pair with no relation; never reported by `extract`."""
PARAMETER = "parameter"
"""Entity label that never links (a parameter is not a knowledge-base entity)."""
PRIORS = "priors.json"
"""Train link counts of surface strings (models/kb_features.py `Priors`), the linker's prior features."""
ENTITY_COLUMNS = ["id", "name", "kind", "module", "source", "signature", "doc"]
RELATION_HEADS = ("subject", "span")
"""What a relation's head is in the train data: the documented object (head -1, the stdlib task) or another
mention (user span data); `extract` classifies (subject, entity) pairs or ordered (entity, entity) pairs."""
MAX_PAIRS = 64
"""Ordered entity pairs `extract` classifies per text when relation heads are spans (the first ones in text order)."""

Span = tuple[int, int]


@dataclass
class ExtractorConfig:
    """Trunk shape, label sets and the sizes of the heads."""

    trunk: GPTConfig = field(default_factory=GPTConfig)
    """Shape of the pretrained Transformer trunk."""
    entity_labels: list[str] = field(default_factory=list)
    """Entity types, in tag order (tag 0 = O, then B-x, I-x per label)."""
    relation_labels: list[str] = field(default_factory=lambda: [NO_RELATION])
    """Relation labels in logit order; `none` first."""
    link_dim: int = 64
    """Width of the context and description vectors compared by dot product."""
    right_context: int = 2
    """Tokens after a span's last token whose state represents what follows it."""
    token_features: int = len(TOKEN_FEATURES)
    """Knowledge-base features per token (models/kb_features.py), added to the trunk's states."""
    link_features: int = len(LINK_FEATURES)
    """Features per (mention, candidate) whose learned weights add to the linking score."""
    relation_cues: int = len(CUES)
    """Surface cues per relation tail (models/kb_features.py CUES) read by the relation classifier."""
    relation_heads: str = "subject"
    """RELATION_HEADS: the head of the pairs it was trained on (and `extract` classifies)."""

    def __post_init__(self) -> None:
        if isinstance(self.trunk, dict):
            self.trunk = GPTConfig.from_dict(self.trunk)
        if not self.entity_labels:
            raise ValueError("an extractor needs at least one entity label")
        if not self.relation_labels or self.relation_labels[0] != NO_RELATION:
            raise ValueError(f"relation_labels must start with {NO_RELATION!r}")
        if self.relation_heads not in RELATION_HEADS:
            raise ValueError(f"relation_heads must be one of {RELATION_HEADS}, not {self.relation_heads!r}")

    @property
    def tags(self) -> list[str]:
        """BIO tag names in logit order."""
        return ["O", *[f"{p}-{lab}" for lab in self.entity_labels for p in ("B", "I")]]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ExtractorConfig":
        return cls(**d)


class ExtractorNet(nn.Module):
    """GPT trunk + knowledge-base features + BIO tagger + relation classifier + linking projections."""

    def __init__(self, cfg: ExtractorConfig) -> None:
        super().__init__()
        self.config = cfg
        C, D = cfg.trunk.n_embd, cfg.link_dim
        self.trunk = GPT(cfg.trunk)
        self.kb = nn.Linear(cfg.token_features, C)
        self.subject = nn.Embedding(len(SUBJECT_KINDS), C)
        self.tagger = nn.Sequential(nn.Linear(2 * C, C), nn.GELU(), nn.Linear(C, len(cfg.tags)))
        self.relation = nn.Sequential(
            nn.Linear(4 * C + cfg.relation_cues, C), nn.GELU(), nn.Linear(C, len(cfg.relation_labels))
        )
        self.mention_proj = nn.Linear(3 * C, D)
        self.desc_proj = nn.Linear(C, D)
        self.link_prior = nn.Linear(cfg.link_features, 1)
        heads = (self.kb, *self.tagger, *self.relation, self.mention_proj, self.desc_proj, self.link_prior)
        for head in heads:
            if isinstance(head, nn.Linear):  # small heads on the trunk's large states: calm first steps
                nn.init.normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)
        nn.init.normal_(self.subject.weight, std=0.02)

    def forward(self, idx: torch.Tensor, lengths: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Token states (B, T, C) of right-padded ids (B, T) plus their knowledge-base features (B, T, F)."""
        h = self.trunk.hidden(idx, lengths)
        if features is None:
            return h
        return h + self.kb(features.to(h.dtype))

    def tag_logits(self, h: torch.Tensor) -> torch.Tensor:
        """(B, T, tags): each token read with the next token's state (the trunk is causal: `ValueError` is
        tagged knowing what follows its first piece)."""
        nxt = torch.cat([h[:, 1:], torch.zeros_like(h[:, :1])], dim=1)
        return self.tagger(torch.cat([h, nxt], dim=-1))

    def subject_vectors(self, means: torch.Tensor, kinds: torch.Tensor) -> torch.Tensor:
        """(B, C) head vectors of the documented object: its text's mean state plus its kind's embedding."""
        return means + self.subject(kinds)

    def span_features(self, h: torch.Tensor, lengths: torch.Tensor, spans: torch.Tensor) -> torch.Tensor:
        """(S, 3C): [mean of the span's tokens, state `right_context` tokens after it, mean of its text] for token
        spans (S, 3) = (row, first token, end token exclusive)."""
        B, T, C = h.shape
        pos = torch.arange(T, device=h.device)
        rows, lo, hi = spans[:, 0], spans[:, 1], spans[:, 2]
        inside = ((pos[None] >= lo[:, None]) & (pos[None] < hi[:, None])).to(h.dtype)  # (S, T)
        mean = torch.einsum("st,stc->sc", inside, h[rows]) / (hi - lo).clamp(min=1)[:, None].to(h.dtype)  # (S, C)
        right_at = torch.minimum(hi - 1 + self.config.right_context, lengths[rows] - 1)
        right = h[rows, right_at]  # (S, C)
        return torch.cat([mean, right, self.text_means(h, lengths)[rows]], dim=-1)

    @staticmethod
    def text_means(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Mean token state of each text (B, C)."""
        mask = (torch.arange(h.size(1), device=h.device)[None] < lengths[:, None]).to(h.dtype)  # (B, T)
        return (h * mask[..., None]).sum(1) / lengths[:, None].to(h.dtype)

    def relation_logits(self, head: torch.Tensor, tail: torch.Tensor, cues: torch.Tensor) -> torch.Tensor:
        """(P, R) logits for head vectors (P, C), tail span features (P, 3C) and the tails' cues (P, n_cues)."""
        C = head.size(-1)
        tail_mean, tail_right = tail[:, :C], tail[:, C : 2 * C]
        return self.relation(torch.cat([head, tail_mean, tail_right, head * tail_mean, cues.to(head.dtype)], dim=-1))

    def context_vectors(self, features: torch.Tensor) -> torch.Tensor:
        """(S, D) linking vectors of span features (S, 3C)."""
        return self.mention_proj(features)

    def link_logits(self, ctx: torch.Tensor, cands: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """(..., K) scores of candidates: context (..., D) . description (..., K, D) + learned prior of features
        (..., K, F)."""
        return torch.einsum("...d,...kd->...k", ctx, cands) + self.link_prior(features.to(ctx.dtype)).squeeze(-1)

    def describe(self, pooled: torch.Tensor) -> torch.Tensor:
        """(N, D) description vectors of pooled description states (N, C), scaled by 1/sqrt(D) so that a dot
        product with a context vector is a well-scaled logit."""
        return self.desc_proj(pooled) / self.config.link_dim**0.5


# ---------------------------------------------------------------------------------------------
# text <-> tokens


@dataclass
class Encoded:
    """Right-padded ids (B, T), lengths (B,) and each text's kept token offsets (character start, end)."""

    ids: torch.Tensor
    lengths: torch.Tensor
    offsets: list[list[Span]]


def encode(tokenizer, texts: list[str], max_length: int, pad_id: int) -> Encoded:
    """Tokenize `texts` (at most `max_length` tokens each, at least 1) keeping the character offsets."""
    encs = tokenizer.encode_batch(list(texts))
    kept = [e.ids[:max_length] or [pad_id] for e in encs]
    offsets = [list(e.offsets[:max_length]) or [(0, 0)] for e in encs]
    ids = torch.full((len(kept), max((len(k) for k in kept), default=1)), pad_id, dtype=torch.long)
    for i, seq in enumerate(kept):
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return Encoded(ids, torch.tensor([len(k) for k in kept], dtype=torch.long), offsets)


def token_span(offsets: list[Span], span: Span) -> Span | None:
    """(first token, end token exclusive) of the tokens overlapping character span `span`; None if none is kept."""
    start, end = span
    ends = [e for _, e in offsets]
    first = bisect.bisect_right(ends, start)  # the first token ending after `start`
    last = first
    while last < len(offsets) and offsets[last][0] < end:
        last += 1
    return (first, last) if last > first else None


def bio_targets(offsets: list[Span], spans: list[Span], label_ids: list[int], length: int) -> list[int]:
    """Tag ids per token (0 = O, 1 + 2k = B of label k, 2 + 2k = I) for character spans with label indices."""
    tags = [0] * length
    for span, k in zip(spans, label_ids):
        tok = token_span(offsets, span)
        if tok is None:
            continue
        first, last = tok
        if any(tags[first:last]):  # a token shared with another span keeps the first span's tag
            continue
        tags[first] = 1 + 2 * k
        tags[first + 1 : last] = [2 + 2 * k] * (last - first - 1)
    return tags


def decode_tags(text: str, offsets: list[Span], probs: np.ndarray, labels: list[str]) -> list[dict]:
    """Valid, non-overlapping character spans from per-token tag probabilities (T, 1 + 2K).

    A span opens at a B tag (or an I tag that does not continue the open span) and goes on over I tags of its
    label; its characters are its tokens' offsets with surrounding whitespace trimmed; its score is the mean
    probability of its tokens' tags.
    """
    tags = probs.argmax(-1)
    runs: list[tuple[int, int, int]] = []  # (label index, first token, end token)
    for t, tag in enumerate(tags[: len(offsets)]):
        if tag == 0:
            continue
        k, inside = (tag - 1) // 2, (tag - 1) % 2 == 1
        if inside and runs and runs[-1][0] == k and runs[-1][2] == t:
            runs[-1] = (k, runs[-1][1], t + 1)
        else:
            runs.append((k, t, t + 1))
    spans, floor = [], 0
    for k, first, last in runs:
        start, end = max(offsets[first][0], floor), offsets[last - 1][1]
        while start < end and text[start].isspace():
            start += 1
        while end > start and text[end - 1].isspace():
            end -= 1
        if start >= end:
            continue
        score = float(probs[np.arange(first, last), tags[first:last]].mean())
        spans.append({"start": start, "end": end, "text": text[start:end], "label": labels[k], "score": score})
        floor = end
    return spans


def description(entity) -> str:
    """The text a candidate is described by: id, kind, signature and first docstring line."""
    return " ".join(str(x) for x in (entity.id, entity.kind, entity.signature, entity.doc) if x)


@torch.no_grad()
def pooled_states(trunk: GPT, tokenizer, texts: list[str], max_length: int, batch_size: int = 256) -> torch.Tensor:
    """Mean trunk state (N, C) of each text (at most `max_length` tokens), in batches of similar lengths."""
    pad_id = tokenizer.token_to_id(PAD)
    enc = encode(tokenizer, texts, max_length, pad_id)
    order = torch.argsort(enc.lengths, stable=True)
    out = torch.zeros(len(texts), trunk.config.n_embd)
    trunk.eval()
    for i in range(0, len(texts), batch_size):
        rows = order[i : i + batch_size]
        n = enc.lengths[rows]
        h = trunk.hidden(enc.ids[rows, : int(n.max())], n)
        out[rows] = ExtractorNet.text_means(h, n).float()
    return out


# ---------------------------------------------------------------------------------------------
# the bundle


def token_features(kb: KnowledgeIndex, texts: list[str], enc: Encoded, subjects: list[Subject]) -> torch.Tensor:
    """(B, T, F) knowledge-base features of an encoded batch (0 on pads)."""
    out = torch.zeros(*enc.ids.shape, len(TOKEN_FEATURES))
    for b, (text, offsets, subject) in enumerate(zip(texts, enc.offsets, subjects)):
        n = int(enc.lengths[b])
        out[b, :n] = torch.from_numpy(kb.token_features(text, offsets[:n], subject))
    return out


def write_extractor(
    model: ExtractorNet,
    folder: Path,
    tokenizer_dir: Path,
    kb: KnowledgeIndex,
    pooled: torch.Tensor,
    rows: list[int],
    extra: dict | None = None,
) -> None:
    """Write the bundle into existing folder `folder` (stages pass an atomic one).

    `pooled` (N, C) are the description states of entity rows `rows` (see `pooled_states`); they are projected
    with the model's description head here, so the saved vectors always match the saved weights.
    """
    folder = Path(folder)
    save_model(model, str(folder / WEIGHTS))
    meta = {"kind": KIND, "config": model.config.to_dict(), **(extra or {})}
    (folder / CONFIG).write_text(json.dumps(meta, indent=2))
    shutil.copyfile(Path(tokenizer_dir) / TOKENIZER_FILE, folder / TOKENIZER_FILE)
    kb.entities[ENTITY_COLUMNS].reset_index(drop=True).to_parquet(folder / ENTITIES, index=False)
    (folder / PRIORS).write_text(json.dumps(kb.priors, sort_keys=True))
    with torch.no_grad():
        vectors = model.describe(pooled.float()).contiguous()
    save_file({"vectors": vectors, "rows": torch.tensor(rows, dtype=torch.long)}, str(folder / CANDIDATES))


class Extractor:
    """A loaded bundle: tagging, relation classification and linking of raw texts (inference only).

    Every call takes `subjects`: per text the entity id of the documented object (or None), whose module, class
    and parameters the knowledge-base features compare mentions with.
    """

    def __init__(self, model: ExtractorNet, tokenizer, kb: KnowledgeIndex, vectors: dict, meta: dict, version: str):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.token_to_id(PAD)
        self.kb = kb
        self.entities = kb.entities
        self.vectors = torch.zeros(len(kb.entities), model.config.link_dim)
        self.vectors[vectors["rows"].long()] = vectors["vectors"]  # an empty KB's rows may load as a float tensor
        self.meta = meta
        self.max_length = int(meta.get("max_length", model.config.trunk.block_size))
        self.version = version

    @property
    def entity_labels(self) -> list[str]:
        return list(self.model.config.entity_labels)

    @property
    def relation_labels(self) -> list[str]:
        return list(self.model.config.relation_labels)

    def _batches(self, texts: list[str], subjects: list[str | None] | None, batch_size: int):
        """(first row, encoded batch, its subjects, token states) per batch of `texts`."""
        subjects = subjects or [None] * len(texts)
        if len(subjects) != len(texts):
            raise ValueError(f"{len(subjects)} subjects for {len(texts)} texts")
        for i in range(0, len(texts), batch_size):
            chunk = texts[i : i + batch_size]
            enc = encode(self.tokenizer, chunk, self.max_length, self.pad_id)
            subs = [self.kb.subject(s) for s in subjects[i : i + batch_size]]
            feats = token_features(self.kb, chunk, enc, subs)
            yield i, enc, subs, self.model(enc.ids, enc.lengths, feats).float()

    def _features(self, h, enc: Encoded, spans: list[list[Span]]) -> tuple[torch.Tensor, list[list[int | None]]]:
        """Span features (S, 3C) of every kept span, and per text the row of each span in them (None: cut off)."""
        rows, where, n = [], [], 0
        for b, text_spans in enumerate(spans):
            mine = []
            for span in text_spans:
                tok = token_span(enc.offsets[b], tuple(span))
                mine.append(None if tok is None else n)
                if tok is not None:
                    rows.append((b, *tok))
                    n += 1
            where.append(mine)
        if not rows:
            return h.new_zeros(0, 3 * h.size(-1)), where
        return self.model.span_features(h, enc.lengths, torch.tensor(rows, dtype=torch.long)), where

    def _tag_rows(self, texts: list[str], h, enc: Encoded, i: int) -> list[list[dict]]:
        probs = self.model.tag_logits(h).softmax(-1).numpy()
        labels = self.entity_labels
        return [
            decode_tags(texts[i + b], enc.offsets[b], probs[b, : int(enc.lengths[b])], labels)
            for b in range(len(enc.offsets))
        ]

    @torch.no_grad()
    def tag(self, texts: list[str], batch_size: int = 32, subjects: list | None = None) -> list[list[dict]]:
        """Entity spans of each text: {start, end, text, label, score}."""
        out = []
        for i, enc, _, h in self._batches(texts, subjects, batch_size):
            out += self._tag_rows(texts, h, enc, i)
        return out

    def _link_rows(self, texts, spans: list[list[Span]], h, enc, i: int, subs) -> list[list[tuple[str, float]]]:
        feats, where = self._features(h, enc, spans)
        ctx = self.model.context_vectors(feats)
        out = []
        for b, text_spans in enumerate(spans):
            mine = []
            for span, r in zip(text_spans, where[b]):
                surface = texts[i + b][span[0] : span[1]]
                rows = self.kb.by_name.get(candidate_name(surface), [])
                if len(rows) < 2 or r is None:
                    mine.append((self.kb.ids[rows[0]], 1.0 / max(1, len(rows))) if rows else ("", 0.0))
                    continue
                prior = torch.from_numpy(self.kb.link_features(surface, rows, subs[b]))
                p = self.model.link_logits(ctx[r], self.vectors[rows], prior).softmax(-1)
                best = int(p.argmax())
                mine.append((self.kb.ids[rows[best]], float(p[best])))
            out.append(mine)
        return out

    @torch.no_grad()
    def link(
        self, texts: list[str], spans: list[list[Span]], batch_size: int = 32, subjects: list | None = None
    ) -> list[list[tuple[str, float]]]:
        """(entity id, probability) of each span (start, end) of each text; ("", 0.0) when no entity has its name."""
        out = []
        for i, enc, subs, h in self._batches(texts, subjects, batch_size):
            out += self._link_rows(texts, spans[i : i + len(enc.offsets)], h, enc, i, subs)
        return out

    def _relate_rows(self, texts, pairs: list[list[tuple]], h, enc, i: int, subs) -> list[list[tuple[str, float]]]:
        spans = [[s for pair in text_pairs for s in pair if s is not None] for text_pairs in pairs]
        feats, where = self._features(h, enc, spans)
        kinds = torch.tensor([s.kind_id for s in subs], dtype=torch.long)
        subject = self.model.subject_vectors(self.model.text_means(h, enc.lengths), kinds)
        C = h.size(-1)
        heads, tails, cues, slots = [], [], [], []
        for b, text_pairs in enumerate(pairs):
            k = 0
            for head, tail in text_pairs:
                head_row = None if head is None else where[b][k]
                k += head is not None
                tail_row = where[b][k]
                k += 1
                if tail_row is None or (head is not None and head_row is None):
                    slots.append(None)  # a span cut off by max_length: no relation can be read
                    continue
                heads.append(subject[b] if head is None else feats[head_row, :C])
                tails.append(feats[tail_row])
                cues.append(relation_cues(texts[i + b], tuple(tail)))
                slots.append(len(heads) - 1)
        probs = None
        if heads:
            cue_t = torch.tensor(cues, dtype=h.dtype).reshape(len(heads), -1)
            probs = self.model.relation_logits(torch.stack(heads), torch.stack(tails), cue_t).softmax(-1)
        labels, out, n = self.relation_labels, [], 0
        for text_pairs in pairs:
            mine = []
            for _ in text_pairs:
                slot = slots[n]
                n += 1
                if slot is None:
                    mine.append((NO_RELATION, 1.0))
                else:
                    best = int(probs[slot].argmax())
                    mine.append((labels[best], float(probs[slot, best])))
            out.append(mine)
        return out

    @torch.no_grad()
    def relate(
        self, texts: list[str], pairs: list[list[tuple]], batch_size: int = 32, subjects: list | None = None
    ) -> list[list[tuple[str, float]]]:
        """(label, probability) of each (head, tail) pair of each text: head a character span or None (the subject:
        the documented object), tail a character span."""
        out = []
        for i, enc, subs, h in self._batches(texts, subjects, batch_size):
            out += self._relate_rows(texts, pairs[i : i + len(enc.offsets)], h, enc, i, subs)
        return out

    @torch.no_grad()
    def annotate(
        self,
        texts: list[str],
        pairs: list[list[tuple]],
        spans: list[list[Span]],
        batch_size: int = 32,
        subjects: list | None = None,
    ) -> tuple[list[list[dict]], list[list[tuple[str, float]]], list[list[tuple[str, float]]]]:
        """`tag(texts)`, `relate(texts, pairs)` and `link(texts, spans)` in one forward pass per batch."""
        tags, rels, links = [], [], []
        for i, enc, subs, h in self._batches(texts, subjects, batch_size):
            n = len(enc.offsets)
            tags += self._tag_rows(texts, h, enc, i)
            rels += self._relate_rows(texts, pairs[i : i + n], h, enc, i, subs)
            links += self._link_rows(texts, spans[i : i + n], h, enc, i, subs)
        return tags, rels, links

    @torch.no_grad()
    def extract(self, texts: list[str], subjects: list[str | None] | None = None, batch_size: int = 32) -> list[dict]:
        """Entities (span, label, score, link, link_score) and relations (head -1 = the subject, tail = entity
        index, label, score; `none` omitted) of each text. `subjects[i]`: the entity id of the documented object
        of text i (its module, class and parameters inform the features), or None for free text. Texts are run
        in batches of similar lengths (little padding) and returned in the given order."""
        subjects = subjects or [None] * len(texts)
        if len(subjects) != len(texts):
            raise ValueError(f"{len(subjects)} subjects for {len(texts)} texts")
        order = sorted(range(len(texts)), key=lambda k: len(texts[k]))
        ordered = self._extract_rows([texts[k] for k in order], [subjects[k] for k in order], batch_size)
        out: list[dict] = [{}] * len(texts)
        for k, row in zip(order, ordered):
            out[k] = row
        return out

    def _extract_rows(self, texts: list[str], subjects: list[str | None], batch_size: int) -> list[dict]:
        out = []
        for i, enc, subs, h in self._batches(texts, subjects, batch_size):
            ents = self._tag_rows(texts, h, enc, i)
            spans = [[(e["start"], e["end"]) for e in row] for row in ents]
            links = self._link_rows(texts, spans, h, enc, i, subs)
            index_pairs = [relation_pairs(row, self.model.config.relation_heads) for row in ents]
            pairs = [[(None if a < 0 else row[a], row[b]) for a, b in ips] for row, ips in zip(spans, index_pairs)]
            rels = self._relate_rows(texts, pairs, h, enc, i, subs)
            for b, row in enumerate(ents):
                out.append(_extraction(row, links[b], index_pairs[b], rels[b]))
        return out


def relation_pairs(entities: list[dict], relation_heads: str) -> list[tuple[int, int]]:
    """(head, tail) entity indices `extract` classifies: (-1 = the subject, each non-parameter entity), or, for a
    model trained on span-span pairs, ordered pairs of distinct entities, nearest first (related mentions are
    mostly close), at most MAX_PAIRS."""
    if relation_heads == "span":
        n = len(entities)
        pairs = sorted(((a, b) for a in range(n) for b in range(n) if a != b), key=lambda p: (abs(p[0] - p[1]), p))
        return pairs[:MAX_PAIRS]
    return [(-1, j) for j, e in enumerate(entities) if e["label"] != PARAMETER]


def _extraction(
    entities: list[dict], links: list[tuple[str, float]], pairs: list[tuple[int, int]], relations: list[tuple]
) -> dict:
    """One text's `extract` result from its spans, their links and the (label, score) of each (head, tail) entity
    index pair (head -1: the subject); `none` relations are left out, parameters are never linked."""
    out_relations = [
        {"head": a, "tail": b, "label": label, "score": round(score, 4)}
        for (a, b), (label, score) in zip(pairs, relations)
        if label != NO_RELATION
    ]
    out_entities = []
    for ent, (link, link_score) in zip(entities, links):
        if ent["label"] == PARAMETER:
            link, link_score = "", 0.0
        out_entities.append({**ent, "score": round(ent["score"], 4), "link": link, "link_score": round(link_score, 4)})
    return {"entities": out_entities, "relations": out_relations}


def load_extractor(folder: Path | str) -> Extractor:
    """Load an extractor bundle; `version` is the first 12 hex of model.safetensors' sha256."""
    folder = Path(folder)
    meta = load_json(folder / CONFIG, ("kind", "config"))
    if meta["kind"] != KIND:
        raise ArtifactError(folder / CONFIG, f"not an extractor (kind {meta['kind']!r})")
    try:
        cfg = ExtractorConfig.from_dict(meta["config"])
    except (TypeError, ValueError) as e:
        raise ArtifactError(folder / CONFIG, f"config does not fit kind {KIND!r}: {e}") from None
    model = ExtractorNet(cfg)
    load_weights(model, folder)
    if not (folder / ENTITIES).is_file():
        raise ArtifactError(folder / ENTITIES, "missing")
    entities = pd.read_parquet(folder / ENTITIES)
    priors = load_json(folder / PRIORS)
    vectors = load_tensors(folder / CANDIDATES)
    if set(vectors) != {"vectors", "rows"} or vectors["vectors"].shape[-1] != cfg.link_dim:
        raise ArtifactError(folder / CANDIDATES, f"needs `vectors` (N, {cfg.link_dim}) and `rows` (N,)")
    if len(vectors["rows"]) and int(vectors["rows"].max()) >= len(entities):
        raise ArtifactError(folder / CANDIDATES, f"rows point past the {len(entities)} entities of {ENTITIES}")
    tokenizer = load_tokenizer(folder / TOKENIZER_FILE)
    version = file_sha256(folder / WEIGHTS)[:12]
    return Extractor(model, tokenizer, KnowledgeIndex(entities, priors), vectors, meta, version)
