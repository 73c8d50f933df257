"""BentoML service: the `champion` classifier and its pretrained LM over REST.

Start it with `make serve` (`lmforge serve`, i.e. `bentoml serve deploy.service:LMForge`). Which model it
serves, and how a registry version lands in BentoML's model store, is deploy/resolve.py's docstring.

Endpoints:

- `POST /classify {"texts": [...]}`: label, class probabilities and model version per text; adaptive
  batching merges concurrent requests (LMFORGE_BATCH_MAX_SIZE texts, default 256;
  LMFORGE_BATCH_MAX_LATENCY_MS, default 10000: BentoML answers 503 to a request that would wait longer);
- `POST /generate`, `POST /generate_stream` (plain-text chunks as they are sampled): max_new_tokens,
  temperature, top_k, top_p, stop strings, seed, all bounded (deploy/requests.py's Limits);
- `POST /extract {"texts": [...]}`: the knowledge-graph task's entities (span, type, linked entity id, score) and
  relations (head, relation, tail, score) per text, adaptive batching as for /classify;
- `POST /graph/query {"sparql": "..."}`: read-only SELECT/ASK on the extractor's graph (deploy/sparql.py: updates,
  SERVICE, CONSTRUCT, DESCRIBE refused with 400; at most LMFORGE_SPARQL_MAX_ROWS rows, default 1000; a query past
  LMFORGE_SPARQL_TIMEOUT_S, default 5, is stopped: 408). Both answer 404 when no extractor (or graph) exists
  (deploy/resolve.py's open_kg: classification is served alone then), 503 when one exists but failed to load;
- `POST /search {"query": "...", "k": 10, "mode": "hybrid"}`: the alignment task's k best indexed items (id, score,
  qualified name, source, line, snippet) for a natural-language query; `k` 1..100, `mode` dense | bm25 | hybrid
  (unset: the registered version's `served_mode`);
- `POST /embed {"texts": [...], "kind": "text" | "code"}`: unit-length vectors by the encoder's text or code tower.
  Both batch concurrent requests into one forward pass (deploy/batching.py: BentoML's batchable APIs take one
  parameter only; LMFORGE_BATCH_MAX_SIZE items per batch, default 64) and answer 404 when no encoder exists
  (deploy/resolve.py's open_search), 503 when one exists but failed to load (or its index is missing);
- `GET /metadata`: registered model name and version, variant, lineage, gates and test metrics, and `tasks`:
  every served task and its version (`tasks.align`: the encoder, its index's backend and size, the served mode);
- `POST /reload`: load the registry's current @champion without a restart (needs LMFORGE_API_KEY);
- `/healthz`, `/livez` (the process is up), `/readyz` (a model is loaded; 503 with the reason otherwise),
  `/metrics` (Prometheus: request counts and latency by endpoint and status), all BentoML's own.

Bad requests get a 4xx with a message, never a 5xx: invalid JSON, wrong types, empty or too-long texts,
too many items (400), a body that is not JSON (415), too large (413). With LMFORGE_API_KEY set, every
endpoint but the probes, /metrics and the API docs needs `Authorization: Bearer <key>` or `X-API-Key: <key>` (401).

A model that cannot be found or loaded never crash-loops the server: `check_model` names the problem
in one line before start-up, and a worker started anyway stays up, logs that line once, and answers
/readyz, /classify, /generate and /metadata with HTTP 503 and the same line.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import threading
from typing import Annotated, Generator, Literal

import bentoml
from bentoml.validators import ContentType
from fastapi import FastAPI
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.responses import JSONResponse

from deploy.core import (
    AlignUnavailable,
    CannotGenerate,
    KgUnavailable,
    align_batchers,
    check_can_generate,
    classify,
    describe,
    extract,
    graph_query,
    stream,
)
from deploy.core import generate as generate_text
from deploy.requests import (
    API_KEY_ENV,
    EXAMPLE_DOCSTRINGS,
    EXAMPLE_INPUT,
    EXAMPLE_PROMPT,
    EXAMPLE_QUERY,
    EXAMPLE_SPARQL,
    LIMITS,
    MAX_BODY_BYTES,
    GenerationRequest,
    InvalidInput,
    unicode_problem,
)
from deploy.resolve import ModelUnavailable, ServedKG, ServedModel, ServedSearch, open_kg, open_model, open_search
from deploy.runtime import WORKERS_ENV
from deploy.sparql import GraphQueries, QueryRefused, QueryTimeout

BATCH_SIZE_ENV, BATCH_LATENCY_ENV = "LMFORGE_BATCH_MAX_SIZE", "LMFORGE_BATCH_MAX_LATENCY_MS"
ACCESS_LOG_ENV, TRACING_ENV = "LMFORGE_ACCESS_LOG", "LMFORGE_TRACING"
SPARQL_TIMEOUT_ENV, SPARQL_ROWS_ENV, SPARQL_WORKERS_ENV = (
    "LMFORGE_SPARQL_TIMEOUT_S",
    "LMFORGE_SPARQL_MAX_ROWS",
    "LMFORGE_SPARQL_WORKERS",
)
PUBLIC = ("/healthz", "/livez", "/readyz", "/metrics", "/docs.json", "/")
"""Paths open without the API key: the probes, Prometheus and the API docs."""
ALIGN_ROUTES = ("/search", "/embed")
JSON_ROUTES = ("/classify", "/generate", "/generate_stream", "/reload", "/extract", "/graph/query", *ALIGN_ROUTES)

logger = logging.getLogger("bentoml.lmforge")


def check_model(uri: str | None = None) -> str:
    """Preflight of `lmforge serve`: load the model the service would serve; returns a one-line description.

    Raises:
        ModelUnavailable: with one line naming what is wrong and where.
    """
    return describe(open_model(uri, to_store=False))


def _env_int(name: str, default: int, low: int) -> int:
    raw = os.environ.get(name, "")
    try:
        value = int(raw) if raw.strip() else default
    except ValueError:
        raise SystemExit(f"lmforge: error: {name}={raw!r} is not an integer") from None
    if value < low:
        raise SystemExit(f"lmforge: error: {name}={value} must be at least {low}")
    return value


def _nonblank(s: str) -> str:
    if not s.strip():
        raise ValueError("text is empty or only whitespace")
    return _unicode(s)


def _unicode(s: str) -> str:
    if problem := unicode_problem(s):
        raise ValueError(problem)
    return s


Text = Annotated[str, Field(min_length=1, max_length=LIMITS.max_text_chars), AfterValidator(_nonblank)]
Texts = Annotated[list[Text], Field(min_length=1, max_length=LIMITS.max_items)]
Prompt = Annotated[str, Field(min_length=1, max_length=LIMITS.max_prompt_chars), AfterValidator(_nonblank)]
Stop = Annotated[
    list[Annotated[str, Field(min_length=1, max_length=LIMITS.max_stop_chars), AfterValidator(_unicode)]],
    Field(max_length=LIMITS.max_stop),
]
MaxNewTokens = Annotated[int, Field(ge=1, le=LIMITS.max_new_tokens, strict=True)]
Temperature = Annotated[float, Field(ge=0.0, le=LIMITS.max_temperature, allow_inf_nan=False)]
TopK = Annotated[int, Field(ge=0, le=LIMITS.max_top_k, strict=True)]
TopP = Annotated[float, Field(ge=LIMITS.min_top_p, le=1.0, allow_inf_nan=False)]  # ge, not gt: BentoML's OpenAPI is 3.0
Seed = Annotated[int, Field(ge=0, le=LIMITS.max_seed, strict=True)]
ExtractText = Annotated[str, Field(min_length=1, max_length=LIMITS.max_extract_chars), AfterValidator(_nonblank)]
ExtractTexts = Annotated[list[ExtractText], Field(min_length=1, max_length=LIMITS.max_extract_items)]
Sparql = Annotated[str, Field(min_length=1, max_length=LIMITS.max_sparql_chars), AfterValidator(_nonblank)]
Query = Annotated[str, Field(min_length=1, max_length=LIMITS.max_query_chars), AfterValidator(_nonblank)]
K = Annotated[int, Field(ge=1, le=LIMITS.max_search_k, strict=True)]
EmbedText = Annotated[str, Field(min_length=1, max_length=LIMITS.max_embed_chars), AfterValidator(_nonblank)]
EmbedTexts = Annotated[list[EmbedText], Field(min_length=1, max_length=LIMITS.max_embed_items)]


class GenerateInput(BaseModel):
    """The body of /generate and /generate_stream (deploy/requests.py's GenerationRequest checks the same bounds)."""

    model_config = ConfigDict(extra="forbid")  # a misspelt setting (`max_tokens`) is a 400, not silently ignored

    prompt: Annotated[Prompt, Field(examples=[EXAMPLE_PROMPT])]
    max_new_tokens: MaxNewTokens = 64
    temperature: Temperature = 0.8
    top_k: TopK = 50
    """0: no top-k cut."""
    top_p: TopP = 1.0
    """Nucleus sampling; 1: no cut."""
    stop: Stop = []
    """Generation ends before the first of these strings (not returned)."""
    seed: Seed | None = None


class Classification(BaseModel):
    label: str
    probabilities: dict[str, float]
    model_version: str
    """`<registered model>/<version>` that answered (`/local` for a bundle folder)."""


ClassifyOutput = Annotated[list[Classification], ContentType("application/json")]
"""/classify's answer, its media type declared (bentoml.validators.ContentType): BentoML would otherwise derive it
from the list's JSON schema, rebuilt on every response (an eighth of the worker's CPU under load)."""


class Entity(BaseModel):
    start: int
    end: int
    """Character offsets into the text, end exclusive."""
    text: str
    label: str
    score: float
    link: str
    """The fully qualified id of the entity the mention refers to ("" when no candidate exists)."""
    link_score: float


class Relation(BaseModel):
    head: int
    """Index into `entities`, or -1: the object the text documents."""
    relation: str
    tail: int
    score: float


class Extraction(BaseModel):
    entities: list[Entity]
    relations: list[Relation]
    model_version: str


ExtractOutput = Annotated[list[Extraction], ContentType("application/json")]


class SearchHit(BaseModel):
    id: str
    score: float
    """The mode's score: cosine similarity (dense), BM25 score (bm25) or fused reciprocal-rank score (hybrid)."""
    qualname: str
    """The item's qualified name (module.Class.function), or its id for a document."""
    source: str
    """The file (or document source) it comes from."""
    line: int
    """Its first line in that file (0 when unknown)."""
    snippet: str
    """Its first non-empty line (a function's signature), at most 200 characters."""


class SearchOutput(BaseModel):
    results: list[SearchHit]
    """Best first, at most k."""
    mode: str
    model_version: str


class EmbedOutput(BaseModel):
    vectors: list[list[float]]
    """One unit-length vector per text, in the order of the request."""
    dim: int
    model_version: str


class Generation(BaseModel):
    prompt: str
    text: str
    finish_reason: str
    """`length`, `stop` (a stop string, not included) or `eos` (the model ended the text)."""
    tokens: int
    model_version: str


_state: dict[str, object] = {"service": None}
"""This worker's LMForge instance, for the ASGI middleware (which BentoML builds apart from the service)."""


class Gatekeeper:
    """ASGI middleware: API key, content type, body size, and 503 while no model is loaded; answered
    before BentoML parses the request, so none of these can surface as a 5xx."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, headers = scope["path"], {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        error = self._refuse(scope["method"], path, headers)
        if error is not None:
            status, message = error
            extra = {"WWW-Authenticate": "Bearer"} if status == 401 else None
            return await JSONResponse({"error": message}, status_code=status, headers=extra)(scope, receive, send)
        return await self.app(scope, receive, send)

    def _refuse(self, method: str, path: str, headers: dict[str, str]) -> tuple[int, str] | None:
        key = os.environ.get(API_KEY_ENV)
        if key and path not in PUBLIC and not path.startswith("/static_content"):
            given = headers.get("x-api-key") or headers.get("authorization", "").removeprefix("Bearer ").strip()
            if not given or not hmac.compare_digest(given.encode(), key.encode()):
                return (
                    401,
                    (
                        "missing or wrong API key: send `Authorization: Bearer <key>` or `X-API-Key: <key>` "
                        f"({API_KEY_ENV} is set on the server)"
                    ),
                )
        if method == "POST" and path in JSON_ROUTES:
            ctype = headers.get("content-type", "application/json").split(";")[0].strip().lower()
            if ctype != "application/json" and not ctype.endswith("+json"):
                return (
                    415,
                    (
                        f"{path}: Content-Type {ctype!r} is not supported; "
                        "send a JSON body with Content-Type: application/json"
                    ),
                )
            size = headers.get("content-length", "0")
            if size.isdigit() and int(size) > MAX_BODY_BYTES:
                return 413, f"{path}: body of {int(size)} bytes is over the limit of {MAX_BODY_BYTES} bytes"
        service = _state["service"]
        if (
            service is not None
            and service.unavailable is not None
            and path in ("/classify", "/generate", "/generate_stream", "/metadata")
        ):
            return 503, f"model unavailable: {service.unavailable}"
        if service is not None and path in ALIGN_ROUTES and service.align is None:
            # 404: no encoder exists; 503: one does, but loading it failed
            return (503 if service.align_failed else 404), f"{path}: not served: {service.align_unavailable}"
        if service is not None and path in ("/extract", "/graph/query"):
            missing = service.kg is None if path == "/extract" else service.graph is None
            if missing:  # 404: this service serves no such task; 503: it should, but loading failed
                return (503 if service.kg_failed else 404), f"{path}: not served: {service.kg_unavailable}"
        return None


class _OneLineBadRequests(logging.Filter):
    """BentoML logs a traceback for every request that fails validation; a 400 is the client's error, so one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            record.name.startswith("bentoml")
            and record.exc_info
            and record.exc_info[0] is not None
            and record.exc_info[0].__name__ in ("ValidationError", "InvalidArgument", "BadInput")
        ):
            record.msg, record.args = f"{record.getMessage()}: {' '.join(str(record.exc_info[1]).split())[:300]}", ()
            record.exc_info, record.levelno, record.levelname = None, logging.WARNING, "WARNING"
        return True


def _one_line_bad_requests() -> None:
    """Shorten BentoML's request-validation tracebacks in this worker's logs.

    They are logged under the `bentoml` logger (BentoML's documented library logger), which in a served worker
    has its own handlers and does not propagate: the filter goes on those handlers, because a filter on a logger
    never sees its children's records and the child's name is BentoML's internal module path.
    """
    for handler in logging.getLogger("bentoml").handlers:
        if not any(isinstance(f, _OneLineBadRequests) for f in handler.filters):
            # first: the handler's own filters (BentoML's copies the level into its line) see the lowered level
            handler.filters.insert(0, _OneLineBadRequests())


http = FastAPI()


@bentoml.service(
    name="lmforge",
    traffic={"timeout": 60},
    workers=_env_int(WORKERS_ENV, 1, 1),
    logging={
        "access": {
            "enabled": os.environ.get(ACCESS_LOG_ENV, "1") != "0",
            "skip_paths": ["/metrics", "/healthz", "/livez", "/readyz"],
        }
    },
    # OpenTelemetry spans cost a tenth of the worker's CPU per request even unsampled: only with LMFORGE_TRACING=1
    # (and an exporter in BentoML's configuration)
    tracing={} if os.environ.get(TRACING_ENV) == "1" else {"excluded_urls": ".*"},
)
@bentoml.asgi_app(http, path="/")
class LMForge:
    def __init__(self) -> None:
        _one_line_bad_requests()  # not at import (no import-time side effects); the worker has its logging by now
        self.model: ServedModel | None = None
        self.unavailable: str | None = None
        self._reload = threading.Lock()
        _state["service"] = self
        workers = _env_int(WORKERS_ENV, 1, 1)
        if (
            workers > 1
        ):  # one share of the cores per worker process: oversubscribed OpenMP threads spin against each other
            import torch

            torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))
        try:
            self.model = open_model()
            logger.info("lmforge: serving %s", describe(self.model))
        except ModelUnavailable as e:  # stay up and say why on every request, instead of crash-looping
            self.unavailable = str(e)
            logger.error("lmforge: no model to serve, answering 503: %s", self.unavailable)
        except Exception as e:  # a bug: its traceback once, then the same 503s (a restart would fail again)
            self.unavailable = f"{type(e).__name__}: {' '.join(str(e).split())}"
            logger.exception("lmforge: loading the model failed, answering 503")
        self.kg_failed = False
        self.kg, self.graph, self.kg_unavailable = self._open_kg()
        self.align_failed = False
        self.align, self.align_unavailable = self._open_search()
        self.searches, self.embeddings = align_batchers(self.align, _env_int(BATCH_SIZE_ENV, 64, 1))

    def _open_search(self) -> tuple[ServedSearch | None, str]:
        """The encoder and its index, or None and why (the other tasks are served either way)."""
        try:
            served = open_search()
        except ModelUnavailable as e:
            logger.error("lmforge: no encoder to serve, /search and /embed answer 503: %s", e)
            self.align_failed = True
            return None, str(e)
        except Exception as e:  # a bug: its traceback once, then 503s
            logger.exception("lmforge: loading the encoder failed, /search and /embed answer 503")
            self.align_failed = True
            return None, f"{type(e).__name__}: {' '.join(str(e).split())}"
        if served is None:
            return None, "no encoder registered or built (the other tasks are served alone)"
        logger.info(
            "lmforge: serving encoder %s and its index (%d items, %s)",
            served.model_version,
            len(served.index.items),
            served.served_mode,
        )
        return served, ""

    def _open_kg(self) -> tuple[ServedKG | None, GraphQueries | None, str]:
        """The extractor and its graph's query workers, or None and why (classification is served either way)."""
        try:
            kg = open_kg()
        except ModelUnavailable as e:
            logger.error("lmforge: no extractor to serve, /extract answers 503: %s", e)
            self.kg_failed = True
            return None, None, str(e)
        if kg is None:
            return None, None, "no extractor registered or built (classification is served alone)"
        if kg.graph is None:
            return kg, None, f"{kg.uri} has no graph.nt"
        graph = GraphQueries(
            kg.graph,
            workers=_env_int(SPARQL_WORKERS_ENV, 1, 1),
            timeout=float(_env_int(SPARQL_TIMEOUT_ENV, int(LIMITS.sparql_timeout_s), 1)),
            max_rows=_env_int(SPARQL_ROWS_ENV, LIMITS.sparql_rows, 1),
        )
        logger.info("lmforge: serving extractor %s and its graph (%d triples)", kg.model_version, graph.triples)
        return kg, graph, ""

    def __is_ready__(self) -> bool:
        """/readyz: 503 with the reason while there is no model."""
        if self.unavailable is not None:
            from starlette.exceptions import HTTPException

            raise HTTPException(status_code=503, detail=f"model unavailable: {self.unavailable}")
        return True

    @bentoml.api(
        batchable=True,
        max_batch_size=_env_int(BATCH_SIZE_ENV, LIMITS.max_items, LIMITS.max_items),
        max_latency_ms=_env_int(BATCH_LATENCY_ENV, 10_000, 10),
    )
    def classify(self, texts: Annotated[Texts, Field(examples=[EXAMPLE_INPUT])]) -> ClassifyOutput:
        """Label each text with the stdlib package it most likely comes from, with class probabilities
        and the model version."""
        model = self.model  # one model for the whole batch, even if /reload swaps it meanwhile
        return [Classification(**p) for p in classify(model, texts)]

    @bentoml.api(
        batchable=True,
        max_batch_size=_env_int(BATCH_SIZE_ENV, LIMITS.max_items, LIMITS.max_items),
        max_latency_ms=_env_int(BATCH_LATENCY_ENV, 10_000, 10),
    )
    def extract(self, texts: Annotated[ExtractTexts, Field(examples=[EXAMPLE_DOCSTRINGS])]) -> ExtractOutput:
        """Entity mentions (span, type, linked entity id, scores) and the relations between them in each text."""
        return [Extraction(**r) for r in extract(self.kg, texts)]

    @bentoml.api(route="/graph/query")
    def graph_query(self, sparql: Annotated[Sparql, Field(examples=[EXAMPLE_SPARQL])]) -> dict:
        """A read-only SPARQL SELECT or ASK query on the knowledge graph (prefixes lf:, rdf:, rdfs:, xsd:, ent:
        declared): SELECT -> vars and rows (at most the row limit; `truncated` says if there were more),
        ASK -> boolean. Updates, SERVICE, CONSTRUCT and DESCRIBE are refused (400); past the time limit, 408."""
        try:
            return graph_query(self.graph, sparql)
        except QueryRefused as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        except QueryTimeout as e:
            return JSONResponse({"error": str(e)}, status_code=408)
        except KgUnavailable as e:
            return JSONResponse({"error": str(e)}, status_code=503)

    @bentoml.api
    async def search(
        self,
        query: Annotated[Query, Field(examples=[EXAMPLE_QUERY])],
        k: K = 10,
        mode: Literal["dense", "bm25", "hybrid"] | None = None,
    ) -> SearchOutput:
        """The k indexed items (functions, or your documents) that best match a natural-language query, best first:
        score, qualified name, source file, line and snippet. `mode` ranks by the encoder (dense), by BM25 over the
        code's words (bm25) or by both fused (hybrid); unset: the mode the evaluation chose (see /metadata)."""
        try:
            (out,) = await asyncio.wrap_future(self.searches.submit((k, mode), [query]))
        except AlignUnavailable as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        return SearchOutput(**out)

    @bentoml.api
    async def embed(
        self,
        texts: Annotated[EmbedTexts, Field(examples=[EXAMPLE_DOCSTRINGS])],
        kind: Literal["text", "code"],
    ) -> EmbedOutput:
        """Unit-length vectors of the texts by the encoder's text tower (kind "text": queries, docstrings) or code
        tower (kind "code"); a text's and a code's vectors are comparable by dot product."""
        try:
            vectors = await asyncio.wrap_future(self.embeddings.submit(kind, texts))
        except AlignUnavailable as e:
            return JSONResponse({"error": str(e)}, status_code=503)
        return EmbedOutput(vectors=vectors, dim=len(vectors[0]), model_version=self.align.model_version)

    def _request(self, params: dict) -> GenerationRequest | JSONResponse:
        try:
            check_can_generate(self.model)
            return GenerationRequest(**{**params, "stop": tuple(params["stop"])})
        except (CannotGenerate, InvalidInput) as e:
            return JSONResponse({"error": str(e)}, status_code=400)

    @bentoml.api(input_spec=GenerateInput)
    def generate(self, **params) -> Generation:
        """Continue `prompt` with the pretrained language model; ends at max_new_tokens, a stop string
        or the model's end of text."""
        model = self.model
        req = self._request(params)
        if isinstance(req, JSONResponse):
            return req
        out = generate_text(model, req)
        return Generation(
            prompt=req.prompt,
            text=out.text,
            finish_reason=out.finish_reason,
            tokens=out.tokens,
            model_version=model.model_version,
        )

    @bentoml.api(route="/generate_stream", input_spec=GenerateInput)
    def generate_stream(self, **params) -> Generator[str, None, None]:
        """/generate as plain-text chunks, sent as they are sampled."""
        req = self._request(params)
        if isinstance(req, JSONResponse):
            return req
        return stream(self.model, req)

    @bentoml.api(route="/reload")
    def reload(self) -> dict:
        """Load the registry's current @champion (or LMFORGE_MODEL_URI) in this worker; needs LMFORGE_API_KEY
        on the server."""
        if not os.environ.get(API_KEY_ENV):
            return JSONResponse(
                {"error": f"/reload is disabled: set {API_KEY_ENV} on the server to enable it (or restart the server)"},
                status_code=403,
            )
        with self._reload:
            before = self.model.model_version if self.model else None
            try:
                model = open_model()
            except ModelUnavailable as e:  # keep serving what we have
                return JSONResponse({"error": f"reload failed, still serving {before}: {e}"}, status_code=409)
            self.model, self.unavailable = model, None
        logger.info("lmforge: reloaded: %s (was %s)", describe(model), before)
        return {"model_version": model.model_version, "previous": before, "changed": model.model_version != before}

    @http.get("/metadata")
    def metadata(self) -> dict:
        """Registered model name and version, variant, lineage (git commit, data hashes, params hash, validation,
        flow run), gates and test metrics."""
        if self.model is None:
            return JSONResponse({"error": f"model unavailable: {self.unavailable}"}, status_code=503)
        return {**self.model.metadata(), "tasks": self.tasks()}

    def tasks(self) -> dict:
        """Every served task and its model version (the extractor's `null`, with the reason, when not served)."""
        kg = self.kg.metadata() if self.kg is not None else None
        if kg is not None:
            kg["graph_triples"] = self.graph.triples if self.graph is not None else None
        return {
            "classification": {"model_version": self.model.model_version},
            "kg": kg,
            **({"kg_unavailable": self.kg_unavailable} if self.kg_unavailable else {}),
            "align": self.align.metadata() if self.align is not None else None,
            **({"align_unavailable": self.align_unavailable} if self.align_unavailable else {}),
        }


LMForge.add_asgi_middleware(Gatekeeper)
