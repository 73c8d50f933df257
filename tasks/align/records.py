"""The alignment task's tables: the raw pairs ingest writes, and the pairs and items align_data writes.

`paths.raw_pairs` (ingest): one row per function (or one of your pairs or documents): its docstring as `text`
("" when it has none), its code without the docstring as `code`, where it comes from (`qualname`, `module`,
`source`, `line`) and its `split`: train/val/test, or `index` for a document that is only searched, never
trained on. The stdlib rows come from the AST (`function_pairs`).

`paths.align_data` (align_data): PAIRS_FILE (the pairs to train and evaluate on: PAIR_DATA_COLUMNS) and
ITEMS_FILE (what the index holds: ITEM_COLUMNS; row i of the index is row i of this table), plus the
Great Expectations result. The test pool is the items with split `test`; a test pair's gold item has its `id`.
"""

from __future__ import annotations

import ast
import re
import textwrap
from collections import deque
from pathlib import Path, PurePosixPath

import pandas as pd

from tasks.shared.io import read_parquet

PAIR_COLUMNS = ["id", "text", "code", "qualname", "module", "source", "line", "split"]
"""The columns of `paths.raw_pairs`: all strings except `line` (int64)."""
PAIRS_FILE = "pairs.parquet"
PAIR_DATA_COLUMNS = ["id", "text", "query", "code", "qualname", "module", "source", "split"]
"""The columns of `<paths.align_data>/pairs.parquet` (all strings): `query` is what evaluation searches with."""
ITEMS_FILE = "items.parquet"
ITEM_COLUMNS = ["id", "code", "qualname", "source", "line", "snippet", "split"]
"""The columns of `<paths.align_data>/items.parquet`: all strings except `line` (int64); `snippet` is the first
non-empty line of `code` (a function's signature), cut to SNIPPET_CHARS."""
SNIPPET_CHARS = 200
INDEX_SPLIT = "index"
"""The split of your documents (`ingest.documents`): indexed and searched, never trained or evaluated on."""
FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
BLOCKS = ("body", "handlers", "orelse", "finalbody", "cases")
"""The fields that hold statements (or handlers / match cases), in the order `ast.iter_child_nodes` visits them."""
_NEWLINE = re.compile(r"\r\n|\r|\n")


def pair_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows (dicts, or a frame with at least these columns) as a frame of exactly PAIR_COLUMNS (`line` int64,
    the rest strings)."""
    df = pd.DataFrame(rows, columns=PAIR_COLUMNS)
    return df.astype({c: "int64" if c == "line" else object for c in PAIR_COLUMNS})


def module_name(source: str) -> str:
    """The dotted module of a file path relative to the stdlib root: `asyncio/futures.py` -> `asyncio.futures`,
    `email/__init__.py` -> `email`."""
    parts = list(PurePosixPath(source).with_suffix("").parts)
    if len(parts) > 1 and parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _docstring_node(node: ast.AST) -> ast.Expr | None:
    """The statement `ast.get_docstring` reads the docstring from, if any."""
    body = getattr(node, "body", None)
    if body and isinstance(body[0], ast.Expr):
        value = body[0].value
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return body[0]
    return None


def _split_at(line: str, col: int) -> tuple[str, str]:
    """`line` cut at AST column `col` (a UTF-8 byte offset)."""
    raw = line.encode()
    return raw[:col].decode(errors="replace"), raw[col:].decode(errors="replace")


def function_code(node: ast.FunctionDef | ast.AsyncFunctionDef, lines: list[str]) -> str:
    """The function's source, decorators included, dedented, with its docstring statement removed (a line that
    held only the docstring goes; code sharing its line stays)."""
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    seg = lines[start - 1 : node.end_lineno]
    doc = _docstring_node(node)
    if doc is not None:
        first, last = doc.lineno - start, doc.end_lineno - start
        head = _split_at(seg[first], doc.col_offset)[0]
        tail = _split_at(seg[last], doc.end_col_offset)[1].strip().removeprefix(";").strip()
        rest = head + tail if not head.strip() else f"{head.rstrip()} {tail}".rstrip()
        seg = seg[:first] + ([rest] if rest.strip() else []) + seg[last + 1 :]
    return textwrap.dedent("\n".join(seg))


def definitions(tree: ast.Module) -> list[tuple[ast.AST, str]]:
    """Every class and function of a parsed module (nested ones too) with its `__qualname__` prefix
    (`Class.`, `outer.<locals>.`), in `ast.walk`'s order (breadth first). Only blocks of statements are
    visited: no expression holds a definition (a lambda is not one), so this costs a fraction of a full walk."""
    out: list[tuple[ast.AST, str]] = []
    queue: deque[tuple[ast.AST, str]] = deque([(tree, "")])
    while queue:
        node, prefix = queue.popleft()
        for block in BLOCKS:
            for child in getattr(node, block, None) or ():
                if isinstance(child, FUNCTIONS):
                    out.append((child, prefix))
                    queue.append((child, f"{prefix}{child.name}.<locals>."))
                elif isinstance(child, ast.ClassDef):
                    out.append((child, prefix))
                    queue.append((child, f"{prefix}{child.name}."))
                elif isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                    queue.append((child, prefix))
    return out


def function_pairs(
    tree: ast.Module, src: str, source: str, defs: list[tuple[ast.AST, str]] | None = None
) -> list[dict]:
    """Every function and method of a parsed file (nested ones too), in line order, as raw pair rows without
    `split`. `qualname` is Python's `__qualname__` under the module (`pkg.mod.Class.method`,
    `pkg.mod.outer.<locals>.inner`); `id` is `<source>:<def line>`, unique per file. `defs`: the tree's
    `definitions`, when the caller has them already."""
    lines = _NEWLINE.split(src)
    module = module_name(source)
    rows = [
        {
            "id": f"{source}:{node.lineno}",
            "text": ast.get_docstring(node) or "",
            "code": function_code(node, lines),
            "qualname": f"{module}.{prefix}{node.name}",
            "module": module,
            "source": source,
            "line": node.lineno,
        }
        for node, prefix in (definitions(tree) if defs is None else defs)
        if isinstance(node, FUNCTIONS)
    ]
    return sorted(rows, key=lambda r: r["line"])


def read_pairs(folder: Path | str) -> pd.DataFrame:
    """The pairs of an align_data folder; missing or broken is a UserError naming the file."""
    return read_parquet(Path(folder) / PAIRS_FILE, PAIR_DATA_COLUMNS)


def read_items(folder: Path | str) -> pd.DataFrame:
    """The items of an align_data folder (what the index holds, in index order)."""
    return read_parquet(Path(folder) / ITEMS_FILE, ITEM_COLUMNS)
