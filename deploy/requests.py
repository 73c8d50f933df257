"""What a valid request to either front end (REST deploy/service.py, gRPC deploy/grpc_server.py) is: the bounds of
every field, the checks that name the field and the bound, and the example inputs that the API docs show and the
promotion smoke gate sends. No torch, no BentoML: cheap to import from anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

API_KEY_ENV = "LMFORGE_API_KEY"
"""When set, both front ends (REST and gRPC) require this key; unset, there is no auth."""
MAX_BODY_BYTES = 32 * 2**20
"""Largest request body (REST) or message (gRPC): the largest valid request (256 texts of 20,000 characters) fits."""
EXAMPLE_INPUT = [
    (
        "def run_until_complete(self, future):\n    future = tasks.ensure_future(future, loop=self)\n"
        "    return future.result()"
    ),
    (
        'def get_content_type(self):\n    """Return the message\'s content type."""\n'
        "    return self.get('content-type', 'text/plain')"
    ),
]
"""Texts to classify: the API docs' example, sent by the promotion smoke gate and the tests."""
EXAMPLE_DOCSTRINGS = [
    "Deserialize s to a Python object. Raises JSONDecodeError if s is not a valid JSON document.",
    "Return a new Message object parsed from the bytes; see email.message.Message.",
]
"""Docstrings to extract entities and relations from: the API docs' example."""
EXAMPLE_SPARQL = (
    "SELECT ?function WHERE { ?function a lf:Function ; lf:raises <https://lmforge.dev/entity/builtins.ValueError> }"
)
"""Which functions raise ValueError: the API docs' example query (lf:, rdf:, rdfs:, xsd:, ent: are declared)."""


EXAMPLE_QUERY = "Return the message's content type."
"""A natural-language query to search the indexed code with: the API docs' example."""
SEARCH_MODES = ("dense", "bm25", "hybrid")
"""How /search ranks: the encoder's vectors, BM25 over the code's words, or both fused by reciprocal rank."""
EMBED_KINDS = ("text", "code")
"""Which tower /embed uses: natural language (queries, docstrings) or code."""

EXAMPLE_PROMPT = "def read_config(path):\n    "
"""A prompt to continue: the API docs' example, sent by the promotion smoke gate."""


@dataclass(frozen=True)
class Limits:
    """Bounds of a request; anything outside them is an InvalidInput (HTTP 400, gRPC INVALID_ARGUMENT)."""

    max_items: int = 256
    max_text_chars: int = 20_000
    """Characters per /classify text: past the longest `max_length` (2,048 tokens); the classifier reads its first
    `max_length` tokens (GET /metadata)."""
    max_prompt_chars: int = 16_000
    """Characters per prompt: room for a 2,048-token context (code runs ~3.5 characters a token); the model reads
    the last `context_tokens` (GET /metadata) of a longer one."""
    max_new_tokens: int = 256
    max_temperature: float = 2.0
    max_top_k: int = 1_000
    min_top_p: float = 0.001
    max_stop: int = 8
    max_stop_chars: int = 64
    max_seed: int = 2**63 - 1
    max_extract_items: int = 64
    """Texts per /extract request."""
    max_extract_chars: int = 4_000
    """Characters per /extract text (the extractor reads its first max_length tokens)."""
    max_sparql_chars: int = 10_000
    sparql_rows: int = 1_000
    """Rows a SELECT answers at most (`truncated: true` when there were more); LMFORGE_SPARQL_MAX_ROWS."""
    sparql_timeout_s: float = 5.0
    """Seconds a query may run before its worker is stopped; LMFORGE_SPARQL_TIMEOUT_S."""
    max_search_k: int = 100
    """Results a /search answers at most."""
    max_query_chars: int = 2_000
    """Characters per /search query (the text tower reads its first max_text_length tokens)."""
    max_embed_items: int = 64
    """Texts per /embed request."""
    max_embed_chars: int = 20_000
    """Characters per /embed text (each tower reads its first max_*_length tokens)."""


LIMITS = Limits()


class InvalidInput(ValueError):
    """A request outside the service's contract; the message names the field and the bound."""


def unicode_problem(text: str) -> str | None:
    """Why `text` is not valid Unicode (JSON may carry unpaired surrogates, which no tokenizer takes), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        return f"not valid Unicode: unpaired surrogate {text[e.start]!r} at character {e.start}"
    return None


def check_sparql(sparql, limits: Limits = LIMITS) -> str:
    """`sparql` if it is a non-blank string of at most max_sparql_chars (what it asks is deploy/sparql.py's check)."""
    if not isinstance(sparql, str) or not sparql.strip():
        raise InvalidInput("sparql: empty or not a string")
    if len(sparql) > limits.max_sparql_chars:
        raise InvalidInput(f"sparql: {len(sparql)} characters, at most {limits.max_sparql_chars}")
    if problem := unicode_problem(sparql):
        raise InvalidInput(f"sparql: {problem}")
    return sparql


def check_texts(texts, limits: Limits = LIMITS, max_items: int = 0, max_chars: int = 0) -> list[str]:
    """`texts` if it is a list of 1..max_items non-blank strings of at most max_chars each (default: the limits'
    max_items and max_text_chars, /classify's)."""
    max_items, max_chars = max_items or limits.max_items, max_chars or limits.max_text_chars
    if not isinstance(texts, (list, tuple)):
        raise InvalidInput(f"texts: expected a list of strings, got {type(texts).__name__}")
    if not texts:
        raise InvalidInput("texts: empty list; send at least one text")
    if len(texts) > max_items:
        raise InvalidInput(f"texts: {len(texts)} items, at most {max_items} per request")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise InvalidInput(f"texts[{i}]: expected a string, got {type(t).__name__}")
        if not t.strip():
            raise InvalidInput(f"texts[{i}]: empty or only whitespace")
        if len(t) > max_chars:
            raise InvalidInput(f"texts[{i}]: {len(t)} characters, at most {max_chars}")
        if problem := unicode_problem(t):
            raise InvalidInput(f"texts[{i}]: {problem}")
    return list(texts)


@dataclass(frozen=True)
class GenerationRequest:
    """A checked /generate request (REST and gRPC): the prompt, how to sample and when to stop."""

    prompt: str
    max_new_tokens: int = 64
    temperature: float = 0.8
    top_k: int = 50
    """0: no top-k cut."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p (1: all)."""
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings (which is not returned)."""
    seed: int | None = None

    def __post_init__(self) -> None:
        check_generation(self)


def check_generation(r: GenerationRequest, limits: Limits = LIMITS) -> GenerationRequest:
    """`r` if every field lies within `limits`, else an InvalidInput naming the first field that does not."""

    def number(name: str, kind: type) -> None:
        v = getattr(r, name)
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, float) if kind is float else int)
            or (kind is float and not math.isfinite(v))
        ):
            raise InvalidInput(f"{name}: expected {'a number' if kind is float else 'an integer'}, got {v!r}")

    if not isinstance(r.prompt, str) or not r.prompt.strip():
        raise InvalidInput("prompt: empty or not a string")
    if len(r.prompt) > limits.max_prompt_chars:
        raise InvalidInput(f"prompt: {len(r.prompt)} characters, at most {limits.max_prompt_chars}")
    if problem := unicode_problem(r.prompt):
        raise InvalidInput(f"prompt: {problem}")
    for name, kind in (("max_new_tokens", int), ("temperature", float), ("top_k", int), ("top_p", float)):
        number(name, kind)
    if not 1 <= r.max_new_tokens <= limits.max_new_tokens:
        raise InvalidInput(f"max_new_tokens: {r.max_new_tokens}, must be 1..{limits.max_new_tokens}")
    if not 0 <= r.temperature <= limits.max_temperature:
        raise InvalidInput(f"temperature: {r.temperature}, must be 0..{limits.max_temperature} (0: greedy)")
    if not 0 <= r.top_k <= limits.max_top_k:
        raise InvalidInput(f"top_k: {r.top_k}, must be 0..{limits.max_top_k} (0: no cut)")
    if not limits.min_top_p <= r.top_p <= 1:
        raise InvalidInput(f"top_p: {r.top_p}, must be {limits.min_top_p}..1")
    if not isinstance(r.stop, (list, tuple)) or len(r.stop) > limits.max_stop:
        raise InvalidInput(f"stop: at most {limits.max_stop} strings")
    for i, s in enumerate(r.stop):
        if not isinstance(s, str) or not s or len(s) > limits.max_stop_chars:
            raise InvalidInput(f"stop[{i}]: must be a non-empty string of at most {limits.max_stop_chars} characters")
        if problem := unicode_problem(s):
            raise InvalidInput(f"stop[{i}]: {problem}")
    if r.seed is not None and (
        isinstance(r.seed, bool) or not isinstance(r.seed, int) or not 0 <= r.seed <= limits.max_seed
    ):
        raise InvalidInput(f"seed: {r.seed!r}, must be an integer 0..2^63-1")
    return r


def check_search(query, k, mode, limits: Limits = LIMITS) -> tuple[str, int, str | None]:
    """(query, k, mode) if the query is a non-blank string of at most max_query_chars, k an integer 1..max_search_k
    and mode None (the served default) or one of SEARCH_MODES."""
    if not isinstance(query, str) or not query.strip():
        raise InvalidInput("query: empty or not a string")
    if len(query) > limits.max_query_chars:
        raise InvalidInput(f"query: {len(query)} characters, at most {limits.max_query_chars}")
    if problem := unicode_problem(query):
        raise InvalidInput(f"query: {problem}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= limits.max_search_k:
        raise InvalidInput(f"k: {k!r}, must be an integer 1..{limits.max_search_k}")
    if mode is not None and mode not in SEARCH_MODES:
        raise InvalidInput(f"mode: {mode!r}, must be one of {', '.join(SEARCH_MODES)}")
    return query, k, mode


def check_embed(texts, kind, limits: Limits = LIMITS) -> tuple[list[str], str]:
    """(texts, kind) if texts are 1..max_embed_items non-blank strings of at most max_embed_chars and kind is one of
    EMBED_KINDS."""
    if kind not in EMBED_KINDS:
        raise InvalidInput(f"kind: {kind!r}, must be one of {', '.join(EMBED_KINDS)}")
    return check_texts(texts, limits, limits.max_embed_items, limits.max_embed_chars), kind
