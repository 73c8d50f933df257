"""The inference core behind every front: the BentoML service (REST, deploy/service.py), the gRPC server
(deploy/grpc_server.py) and the promotion smoke gate. One place decides how texts are classified and continued,
so the protocols cannot drift apart; which model is served is deploy/resolve.py, what a valid request is
deploy/requests.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from deploy.batching import Batcher
from deploy.requests import GenerationRequest
from deploy.resolve import ServedKG, ServedModel, ServedSearch
from deploy.sparql import GraphQueries
from models.sampling import Sampling, decode
from tasks.shared.text import normalize_text


class CannotGenerate(Exception):
    """The served model has no causal LM (HTTP 400, gRPC FAILED_PRECONDITION)."""


def check_can_generate(model: ServedModel) -> None:
    """Raise CannotGenerate unless the served model has a causal LM."""
    if model.bundle.lm is None:
        raise CannotGenerate("the served model has no language model (its bundle has no lm/) and cannot generate text")
    if not model.bundle.can_generate:
        raise CannotGenerate("the served model was pretrained as a masked LM and cannot generate text")


class KgUnavailable(Exception):
    """No extractor or no graph is served (HTTP 503, gRPC UNAVAILABLE); the message says which and why."""


def extract(kg: ServedKG | None, texts: list[str]) -> list[dict]:
    """Entities (span, text, type, linked entity id, scores) and relations (head and tail entity indices, -1 =
    the object the text documents; relation; score) in each text (already checked), with the model version."""
    if kg is None:
        raise KgUnavailable("no extractor is served (register lmforge-extractor or set LMFORGE_EXTRACTOR_URI)")
    out = kg.extractor.extract(texts)
    return [
        {
            "entities": r["entities"],
            "relations": [
                {"head": x["head"], "relation": x["label"], "tail": x["tail"], "score": x["score"]}
                for x in r["relations"]
            ],
            "model_version": kg.model_version,
        }
        for r in out
    ]


def graph_query(graph: GraphQueries | None, sparql: str) -> dict:
    """A read-only SELECT/ASK query's answer from the served graph (deploy/sparql.py: refusals, rows, timeout)."""
    if graph is None:
        raise KgUnavailable("no knowledge graph is served (the extractor's graph.nt was not found)")
    return graph.query(sparql)


class AlignUnavailable(Exception):
    """No encoder is served (HTTP 404/503, gRPC UNAVAILABLE); the message says why."""


def _align(served: ServedSearch | None) -> ServedSearch:
    if served is None:
        raise AlignUnavailable("no encoder is served (register lmforge-encoder or set LMFORGE_ENCODER_URI)")
    return served


def search(served: ServedSearch | None, queries: list[str], k: int, mode: str | None = None) -> list[dict]:
    """The k best items for each query (already checked) by `mode` (None: the served default), with the mode and
    the model version; the queries are embedded by the text tower in one batch (not at all for bm25)."""
    served = _align(served)
    mode = mode or served.served_mode
    vectors = served.encoder.embed(queries, "text") if mode != "bm25" else [None] * len(queries)
    return [
        {
            "results": [_hit(h) for h in served.index.search(q, v, k, mode)],
            "mode": mode,
            "model_version": served.model_version,
        }
        for q, v in zip(queries, vectors)
    ]


def _hit(hit: dict) -> dict:
    """A search hit as both fronts answer it, in plain Python types; an item without a qualified name (a document) is
    named by its id, an unknown source or snippet is "" and an unknown line 0."""
    line = hit.get("line")
    return {
        "id": str(hit["id"]),
        "score": float(hit["score"]),
        "qualname": str(hit.get("qualname") or hit["id"]),
        "source": str(hit.get("source") or ""),
        "line": int(line) if line is not None else 0,
        "snippet": str(hit.get("snippet") or ""),
    }


def embed(served: ServedSearch | None, texts: list[str], kind: str) -> dict:
    """Unit-length vectors of the texts (already checked) by the `kind` tower ("text" or "code"), their dimension and
    the model version."""
    served = _align(served)
    vectors = served.encoder.embed(texts, kind)
    return {"vectors": vectors.tolist(), "dim": int(vectors.shape[1]), "model_version": served.model_version}


def align_batchers(served: ServedSearch | None, max_items: int) -> tuple[Batcher, Batcher]:
    """Batchers merging concurrent searches (of the same k and mode) and embeddings (of the same kind) into one
    forward pass each (deploy/batching.py says why not BentoML's): submit `(k, mode)` + queries, `kind` + texts."""
    searches = Batcher(lambda key, queries: search(served, queries, *key), max_items, "lmforge-search")
    embeddings = Batcher(lambda kind, texts: embed(served, texts, kind)["vectors"], max_items, "lmforge-embed")
    return searches, embeddings


def classify(model: ServedModel, texts: list[str]) -> list[dict]:
    """Label, class probabilities and model version of each text (already checked), each normalized first the
    way the clean stage normalized the training texts (a text that would normalize to nothing stays as it is)."""
    if model.normalize is not None:
        texts = [normalize_text(t, **model.normalize) or t for t in texts]
    return [
        {"label": p.label, "probabilities": p.probabilities, "model_version": model.model_version}
        for p in model.bundle.classify(texts)
    ]


@dataclass
class Generated:
    """A whole continuation, as /generate answers it."""

    text: str
    finish_reason: str
    """`length` (max_new_tokens reached), `stop` (a stop string) or `eos` (the model ended the text)."""
    tokens: int


def stream(model: ServedModel, req: GenerationRequest) -> Iterator[str]:
    """The continuation of `req.prompt` piece by piece as it is sampled (see `generate`); the last value
    returned by the generator (StopIteration.value) is the Generated summary."""
    check_can_generate(model)
    bundle = model.bundle
    hold = max((len(s) for s in req.stop), default=1) - 1  # characters kept back until no stop string can start in them
    ids, new, sent, reason = bundle.tokenizer.encode(req.prompt).ids or [bundle.eot_id], [], 0, "length"
    text = ""
    for token in _tokens(bundle.lm, ids, req):
        tok = int(token)
        if tok == bundle.eot_id:
            reason = "eos"
            break
        new.append(tok)
        text = bundle.tokenizer.decode(new)
        cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
            break
        ready = len(text) - hold
        while ready > sent and text[ready - 1] == "\ufffd":  # an incomplete UTF-8 sequence: wait for its other bytes
            ready -= 1
        if ready > sent:
            yield text[sent:ready]
            sent = ready
    if len(text) > sent:
        yield text[sent:]
    return Generated(text=text, finish_reason=reason, tokens=len(new))


def _tokens(lm, ids: list[int], req: GenerationRequest) -> Iterator[torch.Tensor]:
    """The one sampler (models/sampling.py, with its KV cache) on one prompt, seeded by `req.seed`."""
    gen = torch.Generator().manual_seed(req.seed) if req.seed is not None else None
    sampling = Sampling(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p)
    return decode(lm, torch.tensor([ids]), req.max_new_tokens, sampling, gen)


def generate(model: ServedModel, req: GenerationRequest) -> Generated:
    """The whole continuation of `req.prompt` (the prompt is not repeated)."""
    it = stream(model, req)
    while True:
        try:
            next(it)
        except StopIteration as done:
            return done.value


def describe(model: ServedModel) -> str:
    """One line: what is served (for `lmforge serve` and the logs)."""
    generate_ = "with /generate" if model.bundle.can_generate else "no /generate"
    version = f" ({model.model_version})" if model.version != "local" else ""
    return (
        f"{model.uri}{version}: {model.bundle.variant} classifier over {len(model.bundle.labels)} labels, {generate_}"
    )
