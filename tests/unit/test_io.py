"""The one atomic writer: a target is replaced whole or not at all, and leaves no litter behind.

And `read_table`: user files are read exactly, and every malformed file is one error line naming it."""

from __future__ import annotations

import codecs
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tasks.shared.errors import UserError
from tasks.shared.io import (
    ReadOptions,
    atomic_dir,
    atomic_file,
    expand_inputs,
    iter_table,
    read_table,
    write_csv,
    write_json,
)


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_dir_replaces_an_existing_folder_whole(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
        (d / "stale").write_text("old")
    with atomic_dir(target) as d:
        (d / "a").write_text("2")
    assert _listing(target) == ["a"] and (target / "a").read_text() == "2"
    assert _listing(tmp_path) == ["out"]  # no temporary or old folders left behind


def test_failed_block_leaves_the_old_folder_and_no_temp(tmp_path):
    target = tmp_path / "out"
    with atomic_dir(target) as d:
        (d / "a").write_text("good")
    with pytest.raises(RuntimeError, match="disk full"):
        with atomic_dir(target) as d:
            (d / "partial").write_text("x")
            raise RuntimeError("disk full")
    assert _listing(target) == ["a"] and (target / "a").read_text() == "good"
    assert _listing(tmp_path) == ["out"]


def test_failed_file_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "m.json"
    write_json(target, {"v": 1})
    with pytest.raises(ValueError):
        with atomic_file(target) as tmp:
            tmp.write_text("{half")
            raise ValueError("interrupted")
    assert target.read_text() == '{\n  "v": 1\n}\n'
    assert _listing(tmp_path) == ["m.json"]


def test_leftovers_of_a_killed_writer_are_removed_on_the_next_write(tmp_path):
    """A writer killed with SIGKILL cannot clean up; the next write of that target does."""
    target = tmp_path / "out"
    code = (
        "import os, sys; sys.path.insert(0, sys.argv[2]); from tasks.shared.io import atomic_dir\n"
        "with atomic_dir(sys.argv[1]) as d:\n"
        "    (d / 'partial').write_text('x'); os.kill(os.getpid(), 9)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    res = subprocess.run([sys.executable, "-c", code, str(target), root], capture_output=True, timeout=60)
    assert res.returncode == -9
    assert not target.exists() and len(_listing(tmp_path)) == 1  # only the dead writer's temp folder
    with atomic_dir(target) as d:
        (d / "a").write_text("1")
    assert _listing(tmp_path) == ["out"]


def test_write_csv_has_a_header_and_only_the_named_columns(tmp_path):
    f = tmp_path / "p.csv"
    write_csv(f, [{"step": 0, "loss": 1.5, "lr": 0.1}, {"step": 10, "loss": 1.25}], ["step", "loss"])
    assert f.read_text() == "step,loss\n0,1.5\n10,1.25\n"


def test_outputs_get_ordinary_permissions(tmp_path):
    """Temporary files are private (0600/0700); what is renamed into place follows the umask."""
    umask = os.umask(0o022)
    try:
        write_json(tmp_path / "m.json", {})
        with atomic_dir(tmp_path / "d") as d:
            (d / "a").write_text("1")
    finally:
        os.umask(umask)
    assert (tmp_path / "m.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "d").stat().st_mode & 0o777 == 0o755


ROWS = '{"text": "a", "label": "x"}\n'

# (file name, content, the error after "<file>: ")
MALFORMED = [
    ("bad.jsonl", ROWS + '{"text": "b", "label": \n', "row 2: invalid JSON (Expecting value)"),
    ("list.jsonl", ROWS + "[1, 2]\n", "row 2: expected a JSON object, got an array"),
    ("str.jsonl", ROWS + '\n"just a string"\n', "row 3: expected a JSON object, got a string"),
    ("null.jsonl", "null\n", "row 1: expected a JSON object, got null"),
    ("dupkey.jsonl", '{"text": "a", "text": "b", "label": "x"}\n', "row 1: duplicate key 'text'"),
    (
        "latin1.jsonl",
        (ROWS + '{"text": "caf\xe9"}\n').encode("latin-1"),
        "line 2: not UTF-8 (byte 0xe9 at offset 41); save the file as UTF-8",
    ),
    (
        "latin1.csv",
        "text,label\nok,x\ncaf\xe9,y\n".encode("latin-1"),
        "line 3: not UTF-8 (byte 0xe9 at offset 19); save the file as UTF-8",
    ),
    ("latin1.txt", b"\xef\xbb\xbfab\ncd\xff", "line 2: not UTF-8 (byte 0xff at offset 8); save the file as UTF-8"),
    (
        "nul.jsonl",
        ROWS.encode() + b'{"text": "\x00\x01"}\n',
        "line 2: a NUL byte at offset 38: a binary file, not text",
    ),
    ("png.txt", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "line 3: a NUL byte at offset 8: a binary file, not text"),
    (
        "bad16.csv",
        codecs.BOM_UTF16_LE + "text,label\n".encode("utf-16-le") + b"\x00\xd8a\x00",
        "not valid UTF-16 (illegal UTF-16 surrogate)",
    ),
    ("fields.csv", "text,label\na,x\nb,y,z\n", "row 3: 3 fields, but the header has 2"),
    ("short.csv", "text,label\na,x\nb\n", "row 3: 1 fields, but the header has 2"),
    ("quote.csv", 'text,label\na,x\n"b,y\nc,z\n', "row 3: malformed CSV (unexpected end of data)"),
    ("dupcols.csv", "text,label,text\na,x,b\n", "duplicate column names ['text']"),
    ("header.csv", "text,label\n", "no rows"),
    ("empty.csv", "", "no rows"),
    ("blank.jsonl", "\n  \n", "no rows"),
    ("nolabel.jsonl", '{"text": "a"}\n', "missing column(s) ['label'] (has ['text'])"),
    ("broken.parquet", b"PAR1 not really", "unreadable parquet file (ArrowInvalid: "),
    ("data.tsv", "text\tlabel\n", "unsupported format (use one of .txt, .md, .jsonl, .csv, .parquet)"),
]


@pytest.mark.parametrize(("name", "content", "error"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_read_table_malformed_file_is_one_line_naming_file_and_row(tmp_path, name, content, error):
    f = tmp_path / name
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as err:
        read_table(f, required=["text", "label"])
    msg = str(err.value)
    assert msg.startswith(f"{f}: {error}") and "\n" not in msg


def test_read_table_keeps_values_and_numbers_rows_as_the_file_shows_them(tmp_path):
    f = tmp_path / "d.csv"
    # a BOM, a quoted field over two lines, a blank line, empty cells, numbers and "NA" stay strings
    f.write_bytes(b"\xef\xbb\xbftext,label\r\n" + b'"two\r\nlines",1\r\n\r\nNA,\r\n,007\r\n')
    df = read_table(f, required=["text", "label"])
    assert list(df.columns) == ["text", "label"]
    assert df.index.tolist() == [(str(f), 2), (str(f), 5), (str(f), 6)]
    assert df.to_dict("list") == {"text": ["two\r\nlines", "NA", None], "label": ["1", None, "007"]}


def test_read_table_jsonl_keeps_python_values_and_line_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('\ufeff{"text": "a\u2028b", "label": 3}\n\n{"text": null, "label": "x", "extra": [1]}\n')
    df = read_table(f, required=["text", "label"])
    assert df.index.tolist() == [(str(f), 1), (str(f), 3)]
    assert df["text"].tolist() == ["a\u2028b", None] and df["label"].tolist() == [3, "x"]


def test_read_table_folder_mixes_formats_and_skips_hidden_and_dvc_files(tmp_path):
    (tmp_path / "a.txt").write_text("doc a")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.jsonl").write_text('{"text": "doc b", "kind": "note"}\n')
    pd.DataFrame({"text": ["doc c"]}).to_parquet(tmp_path / "c.parquet")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\xff")
    (tmp_path / ".cache").mkdir()
    (tmp_path / ".cache" / "x.bin").write_bytes(b"\x00")
    (tmp_path / "a.txt.dvc").write_text("outs: []\n")
    df = read_table(tmp_path, required=["text"])
    assert df.index.tolist() == [
        (str(tmp_path / "a.txt"), 0),
        (str(tmp_path / "c.parquet"), 1),
        (str(tmp_path / "sub" / "b.jsonl"), 1),
    ]
    assert df["text"].tolist() == ["doc a", "doc c", "doc b"]
    assert df["source"].tolist()[0] == str(tmp_path / "a.txt") and pd.isna(df["kind"].iloc[0])


def test_read_table_folder_with_an_unsupported_file_names_it(tmp_path):
    (tmp_path / "a.txt").write_text("doc a")
    (tmp_path / "notes.json").write_text("{}")
    with pytest.raises(UserError, match=r"notes\.json: unsupported format"):
        read_table(tmp_path, required=["text"])


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-32"])
def test_read_table_decodes_utf16_and_utf32_with_a_bom(tmp_path, encoding):
    f = tmp_path / "d.csv"
    bom = {"utf-16-be": codecs.BOM_UTF16_BE}.get(encoding, b"")
    f.write_bytes(bom + "text,label\ncafé ☕,x\nzwei,y\n".encode(encoding))
    df = read_table(f, required=["text", "label"])
    assert df["text"].tolist() == ["café ☕", "zwei"] and df.index.tolist() == [(str(f), 2), (str(f), 3)]


def test_read_table_latin1_with_the_encoding_set(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes('{"text": "café", "label": "x"}\n'.encode("latin-1"))
    with pytest.raises(
        UserError, match=r"line 1: not UTF-8 \(byte 0xe9 at offset 13\); save the file as UTF-8 or set ingest.encoding"
    ):
        read_table(f, required=["text"])
    assert read_table(f, required=["text"], opts=ReadOptions(encoding="latin-1"))["text"].tolist() == ["café"]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".txt"])
def test_a_line_over_the_record_limit_is_an_error_read_with_bounded_memory(tmp_path, suffix):
    f = tmp_path / f"big{suffix}"
    head = {".jsonl": b'{"text": "ok"}\n', ".csv": b"text\nok\n", ".txt": b"ok\n"}[suffix]
    with f.open("wb") as fh:  # 3 MB on one line, no newline; the limit is 1 MB
        fh.write(head)
        fh.write(b"x" * (3 << 20))
    with pytest.raises(UserError, match=r"over 1 MB|more than 1 MB|longer than 1 MB") as err:
        read_table(f, required=["text"], opts=ReadOptions(max_record_bytes=1 << 20))
    assert str(err.value).startswith(f"{f}: ") and "\n" not in str(err.value)


def test_iter_table_streams_bounded_chunks_with_row_numbers(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text("".join(f'{{"text": "t{i}", "n": {i}}}\n' for i in range(25)))
    p = tmp_path / "d.parquet"
    pd.DataFrame({"text": [f"p{i}" for i in range(25)], "other": range(25)}).to_parquet(p, row_group_size=7)
    seen = []
    chunks = list(
        iter_table([f, p], required=["text"], columns=["text"], opts=ReadOptions(chunk_rows=10), on_bytes=seen.append)
    )
    assert [len(c) for c in chunks] == [10, 10, 5, 7, 7, 7, 4]  # parquet: never across a row group
    assert all(list(c.columns) == ["text"] for c in chunks)
    rows = pd.concat(chunks)
    assert rows.index.tolist()[:2] == [(str(f), 1), (str(f), 2)] and rows.index.tolist()[-1] == (str(p), 25)
    assert sum(seen[:25]) == f.stat().st_size


def test_globs_folders_and_lists_expand_to_files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in ("a/x.jsonl", "a/y.csv", "a/sub/z.jsonl", "a/.hidden/h.jsonl", "a/x.jsonl.dvc"):
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        Path(name).write_text("{}")
    assert expand_inputs("a/*.jsonl") == [Path("a/x.jsonl")]
    assert expand_inputs("a/**/*.jsonl") == [Path("a/sub/z.jsonl"), Path("a/x.jsonl")]
    assert expand_inputs(["a/y.csv", "a/*.jsonl", "a/x.jsonl"]) == [Path("a/y.csv"), Path("a/x.jsonl")]
    assert expand_inputs(str(tmp_path / "a" / "*.csv")) == [tmp_path / "a" / "y.csv"]
    with pytest.raises(UserError, match=r"^a/\*\.parquet: no files match this pattern$"):
        expand_inputs("a/*.parquet")
