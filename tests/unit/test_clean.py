"""clean: normalization rules, each filter's counts and examples, PII scrubbing, near-duplicates, streaming,
labels, the report and the errors."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import unicodedata

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, TINY_CLEAN, tiny_corpus, tiny_labeled, write_raw
from pydantic import ValidationError

from tasks import clean
from tasks.shared.cleaning import pii, workers
from tasks.shared.cleaning.dedup import HashIndex, NearDuplicates, first_copies, lsh_bands
from tasks.shared.cleaning.files import clean_file, clean_to
from tasks.shared.cleaning.filters import TextCleaner
from tasks.shared.cleaning.pii import PII_TYPES, PLACEHOLDERS, scrub_pii, scrub_texts
from tasks.shared.cleaning.quality import (
    alpha_ratio,
    char_bound,
    char_stats,
    repeated_char_bound,
    repeated_char_ratio,
    repeated_line_ratio,
)
from tasks.shared.cleaning.report import DatasetReport, markdown_report
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError
from tasks.shared.text import normalize_text

CFG = CleanConfig(unicode_form="NFKC", tab_size=4, min_chars=10, max_chars=50, labeled_max_chars=50)
# Only the filter under test: every other filter off.
BARE = CleanConfig(
    min_chars=1,
    min_tokens=0,
    min_alpha_ratio=0,
    max_repeated_line_ratio=1,
    max_repeated_char_ratio=1,
    pii=False,
    exact_dedup=False,
    near_dup=False,
)


def bare(**changes) -> CleanConfig:
    return BARE.model_copy(update=changes)


def corpus_file(tmp_path, texts: list[str], name: str = "raw.parquet", row_group_size: int | None = None, **columns):
    f = tmp_path / name
    df = pd.DataFrame(
        {"id": [f"d{i}" for i in range(len(texts))], "text": texts, "source": "s.py", "kind": "code", **columns}
    )
    df.to_parquet(f, index=False, row_group_size=row_group_size)
    return f


def run_corpus(tmp_path, texts: list[str], cfg: CleanConfig) -> tuple[dict, list[str], DatasetReport]:
    src = corpus_file(tmp_path, texts)
    rep = clean_to(src, tmp_path / "out.parquet", cfg, "corpus", progress=False)
    return rep.metrics(), pd.read_parquet(tmp_path / "out.parquet")["id"].tolist(), rep


# ------------------------------------------------------------------------------------------ normalization
def test_nfkc_normalization():
    assert clean.clean_text("ﬁle Ｆｕｌｌ ①", CFG) == "file Full 1"


def test_other_unicode_forms_are_honoured():
    nfd = CleanConfig(unicode_form="NFD", min_chars=1)
    assert clean.clean_text("é", nfd) == "e\u0301"
    assert clean.clean_text("ﬁ", CleanConfig(unicode_form="NFC", min_chars=1)) == "ﬁ"


def test_crlf_and_lone_cr_become_newlines():
    assert clean.clean_text("a\r\nb\rc\n", CFG) == "a\nb\nc"


def test_tabs_expand_to_tab_stops():
    assert clean.clean_text("\tx = 1\nab\tc", CFG) == "    x = 1\nab  c"
    assert clean.clean_text("\tx", CleanConfig(tab_size=2, min_chars=1)) == "  x"


def test_control_characters_removed_in_ascii_text():
    assert clean.clean_text("a\x00b\x1bc\x07d\x7fe\x0cf", CFG) == "abcdef"


def test_control_and_format_characters_removed_in_unicode_text():
    # zero-width space (Cf), BOM (Cf), NEL (Cc), a private-use char (Co); é and 中 stay
    assert clean.clean_text("\ufeffé\u200b中\x85x\ue000\x00y", CFG) == "é中xy"
    # astral: a tag character (Cf) and a plane-15 private-use one (Co) go, an emoji stays
    assert clean.clean_text("a\U000e0041b\U000f0000c😀", CFG) == "abc😀"


def test_trailing_whitespace_removed_and_indentation_kept():
    src = "def f():   \n    if x:  \n        return 1\t\n"
    assert clean.clean_text(src, CFG) == "def f():\n    if x:\n        return 1"


def test_leading_indentation_of_first_line_kept():
    assert clean.clean_text("\n\n    indented\n", CFG) == "    indented"


def test_blank_line_runs_collapse_to_one_blank_line():
    assert clean.clean_text("a\n\n\n\n\nb\n\nc", CFG) == "a\n\nb\n\nc"
    # lines holding only whitespace count as blank once stripped
    assert clean.clean_text("a\n   \n\t\n  \nb", CFG) == "a\n\nb"


def test_clean_text_is_idempotent():
    once = clean.clean_text("x\r\n\t\ty \n\n\n\u200bz\x00", CFG)
    assert clean.clean_text(once, CFG) == once


def _reference_normalize(text: str, unicode_form: str, tab_size: int) -> str:
    """normalize_text as first written (one category lookup per character): the fast paths must match it."""
    text = unicodedata.normalize(unicode_form, text)
    text = text.replace("\r\n", "\n").replace("\r", "\n").expandtabs(tab_size)
    text = "".join(c for c in text if c == "\n" or unicodedata.category(c) not in {"Cc", "Cf", "Cs", "Co", "Cn"})
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    while "\n\n\n" in text:
        text = text.replace("\n\n\n", "\n\n")
    return text.strip("\n")


def test_fast_normalization_is_identical_to_the_reference():
    rng = random.Random(7)
    pool = "ab \t\r\n\x00\x1f\x7f\x85\u00a0\u2028\u200bé中ﬁ①\ufeff\ue000\U0001f600\U000e0041\ud800 "
    texts = ["", " ", "\n\n", "x \n", "  a\r\n\tb  \n\n\n\nc ", "ﬁ\tx", "\u3000a\u3000\n"]
    texts += ["".join(rng.choice(pool) for _ in range(rng.randint(0, 30))) for _ in range(3000)]
    for form in ("NFC", "NFKC", "NFD", "NFKD"):
        for t in texts:
            assert normalize_text(t, form, 4) == _reference_normalize(t, form, 4), (form, t)


# ------------------------------------------------------------------------------------------ filters
def test_length_filters_count_and_show_examples(tmp_path):
    texts = ["ok text one", "short", "x" * 51, "a b", "one two three four", "  \n  tiny \n"]
    m, ids, rep = run_corpus(tmp_path, texts, bare(min_chars=8, max_chars=50, min_tokens=3, max_tokens=3))
    assert {k: v for k, v in m["removed"].items() if v} == {"too_short": 3, "too_long": 1, "too_many_tokens": 1}
    assert ids == ["d0"]
    assert rep.examples["too_short"] == ["d1 (5 chars): 'short'", "d3 (3 chars): 'a b'", "d5 (6 chars): '  tiny'"]
    assert rep.examples["too_long"] == [f"d2 (51 chars): {'x' * 51!r}"]
    assert rep.examples["too_many_tokens"] == ["d4 (4 tokens): 'one two three four'"]
    assert m["input_rows"] == 6 and m["output_rows"] == 1 and m["output_bytes"] == len("ok text one")


def test_token_filter_counts_whitespace_tokens(tmp_path):
    m, ids, rep = run_corpus(tmp_path, ["one two", "one\ntwo  three", "x"], bare(min_tokens=3))
    assert m["removed"]["too_few_tokens"] == 2 and ids == ["d1"]
    assert rep.examples["too_few_tokens"][0] == "d0 (2 tokens): 'one two'"


def test_quality_ratios():
    assert alpha_ratio("ab 12") == 0.5  # whitespace does not count
    assert alpha_ratio("é1") == 0.5 and alpha_ratio("   ") == 0.0
    assert repeated_line_ratio("a\nb\na\n\n\na\nb") == 3 / 5  # the 2nd a, 3rd a, 2nd b; blank lines ignored
    assert repeated_line_ratio("x = 1\n    x = 1") == 0.0  # another indentation is another line
    assert repeated_char_ratio("=" * 10 + "abcdefghij") == 0.5
    assert repeated_char_ratio("=" * 9 + "a") == 0.0
    assert repeated_char_ratio(" " * 30 + "ab") == 0.0  # blanks are not runs


def test_repeated_char_bound_never_undercuts_the_ratio():
    rng = random.Random(3)
    for _ in range(2000):
        t = "".join(
            rng.choice(["a", "b", "=", " ", "\n", "=" * rng.randint(5, 25), "ab" * 3])
            for _ in range(rng.randint(0, 30))
        )
        assert repeated_char_bound(t) >= repeated_char_ratio(t) - 1e-12, t
    assert repeated_char_bound("def f(x):\n    return x + 1") < 0.1  # code rarely needs the exact scan


def test_quality_filters_remove_junk_and_keep_code(tmp_path):
    code = "def area(r):\n    '''Area of a circle.'''\n    return 3.14159 * r * r"
    texts = [
        code,
        "0x1f 0x2a 0x33 0x44 0x55 0x66 0x77 0x88 ## 12 34 56 78",  # hex dump: few letters
        "buy now\nbuy now\nbuy now\nbuy now\nbuy now\nlimited offer",  # repeated lines: 4 of 6
        "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa!!!!!!!!!!!!!! ok",  # repeated characters
    ]
    cfg = bare(min_alpha_ratio=0.25, max_repeated_line_ratio=0.6, max_repeated_char_ratio=0.5)
    m, ids, rep = run_corpus(tmp_path, texts, cfg)
    assert ids == ["d0"]
    assert {k: m["removed"][k] for k in ("low_alpha", "repeated_lines", "repeated_chars")} == {
        "low_alpha": 1,
        "repeated_lines": 1,
        "repeated_chars": 1,
    }
    assert rep.examples["low_alpha"][0].startswith("d1 (0.24 letters): '0x1f")
    assert rep.examples["repeated_lines"][0].startswith("d2 (0.67 of lines): 'buy now")
    assert rep.examples["repeated_chars"][0].startswith("d3 (0.96 of characters): 'aaaa")


def test_a_ratio_at_its_threshold_is_kept(tmp_path):
    m, ids, _ = run_corpus(
        tmp_path, ["buy now\nbuy now\nbuy now\nbuy now\nlimited offer"], bare(max_repeated_line_ratio=0.6)
    )
    assert ids == ["d0"]  # 3 of 5 lines repeat: 0.6 is not over 0.6


def test_quality_filters_at_their_off_values_remove_nothing(tmp_path):
    texts = ["0x1f 0x2a 0x33", "a\na\na\na", "=" * 40]
    m, ids, _ = run_corpus(tmp_path, texts, bare())
    assert len(ids) == 3 and sum(m["removed"].values()) == 0


def test_exact_duplicates_keep_the_first_copy_across_batches(tmp_path):
    texts = ["def ok():\n    return 1", "def ok():\n    return 1   ", "other text", "def ok():\n    return 1"]
    src = corpus_file(tmp_path, texts, row_group_size=1)
    rep = clean_to(src, tmp_path / "o.parquet", bare(exact_dedup=True, batch_rows=1), "corpus", progress=False)
    assert rep.removed["duplicates"] == 2 and pd.read_parquet(tmp_path / "o.parquet")["id"].tolist() == ["d0", "d2"]
    assert rep.examples["duplicates"] == ["d1: 'def ok():\\n    return 1'", "d3: 'def ok():\\n    return 1'"]


# ------------------------------------------------------------------------------------------ PII
@pytest.mark.parametrize(
    "text, kind, expected",
    [
        ("mail jane.doe+news@mail.example.co.uk today", "email", "mail <EMAIL> today"),
        ("Author: Guido <guido@python.org>", "email", "Author: Guido <<EMAIL>>"),
        ("host 192.168.10.254 is up", "ip", "host <IP> is up"),
        ("connect('8.8.4.4', 53)", "ip", "connect('<IP>', 53)"),
        ("v6 2001:db8:85a3::8a2e:370:7334 and fe80::1ff:fe23:4567:890a", "ip", "v6 <IP> and <IP>"),
        ("call (555) 123-4567", "phone", "call <PHONE>"),
        ("tel: 555-867-5309 or 555.867.5309", "phone", "tel: <PHONE> or <PHONE>"),
        ("+1-202-555-0143 x1234", "phone", "<PHONE>"),
        ("Ring +44 20 7946 0958.", "phone", "Ring <PHONE>."),
        ("dial 001-202-555-0143", "phone", "dial <PHONE>"),
        ("key AKIAIOSFODNN7EXAMPLE here", "secret", "key <SECRET> here"),
        ("token ghp_" + "a1B2" * 9 + " end", "secret", "token <SECRET> end"),
        ("github_pat_" + "11ABCDEFG0" * 4, "secret", "<SECRET>"),
        ("SLACK=xoxb-123456789012-abcdefABCDEF", "secret", "SLACK=<SECRET>"),
        ("OPENAI_API_KEY=sk-proj-" + "Ab1" * 10, "secret", "OPENAI_API_KEY=<SECRET>"),
        ('api_key = "9f8e7d6c5b4a3210"', "secret", 'api_key = "<SECRET>"'),
        ("{'password': 'correct-horse-battery'}", "secret", "{'password': '<SECRET>'}"),
        (
            "AWS_SECRET_ACCESS_KEY='wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY'",
            "secret",
            "AWS_SECRET_ACCESS_KEY='<SECRET>'",
        ),
        (
            "x\n-----BEGIN RSA PRIVATE KEY-----\nMIIEow\nabc==\n-----END RSA PRIVATE KEY-----\ny",
            "secret",
            "x\n<SECRET>\ny",
        ),
    ],
)
def test_each_pii_type_becomes_its_placeholder(text, kind, expected):
    out, counts = scrub_pii(text)
    assert out == expected
    assert counts[kind] == expected.count(PLACEHOLDERS[kind]) and sum(counts.values()) == counts[kind]


@pytest.mark.parametrize(
    "code",
    [
        "__version__ = '1.2.3'",
        "release 3.11.4 of 2023-06-06",
        "version 1.0.0.2",
        "HTML5 section 12.2.5.4",
        "ids = [1.2.3.4.5]",
        "mask = 0xFFFFFFFF; addr = 0x7f000001",
        "x = 127\ny = 255.255\nz = 1e+10 - 3.14159",
        "date: 2024-01-15, time 12:30:45, tz +0100",
        "a[1::2], b[::-1], c[10:20:2]",
        "mac 00:1a:2b:3c:4d:5e",
        "n = 1234567890",
        "phone_number = get_phone(user)",
        'password = getpass.getpass("Password: ")',
        "token = tokens[i]",
        'password = "x"',
        "@decorator\ndef f(): return a@b",
        "std::vector<int> v;",
    ],
)
def test_code_that_only_looks_like_pii_is_untouched(code):
    assert scrub_pii(code) == (code, dict.fromkeys(PII_TYPES, 0))


def test_planted_pii_recall_and_placeholders_survive_normalization():
    rng = random.Random(11)

    def octet():
        return str(rng.randint(1, 254))

    makers = {
        "email": lambda: (
            f"{rng.choice(['john', 'a.b', 'x_y', 'mary-ann'])}{rng.randint(1, 999)}@"
            f"{rng.choice(['example.com', 'mail.org', 'corp.co.uk'])}"
        ),
        "ip": lambda: ".".join(octet() for _ in range(4)),
        "phone": lambda: rng.choice(["({}) {}-{}", "{}-{}-{}", "{}.{}.{}", "+1-{}-{}-{}"]).format(
            rng.randint(201, 989), rng.randint(200, 999), rng.randint(1000, 9999)
        ),
        "secret": lambda: rng.choice(
            [
                "AKIA" + "".join(rng.choice("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567") for _ in range(16)),
                "ghp_" + "".join(rng.choice("abcdefXYZ0123456789") for _ in range(36)),
                "sk-" + "".join(rng.choice("abcdefXYZ0123456789") for _ in range(40)),
            ]
        ),
    }
    found = total = 0
    for kind, make in makers.items():
        for _ in range(50):
            value = make()
            text = rng.choice(["Contact: {} (see above).", "    # {}\n    return x", "s = '{}'", "- {}, then"]).format(
                value
            )
            out, counts = scrub_pii(normalize_text(text))
            total += 1
            found += value not in out and counts[kind] == 1
            assert normalize_text(out) == out and scrub_pii(out)[0] == out  # placeholders survive a second pass
    assert found / total >= 0.95


def test_pii_types_selects_what_is_scrubbed():
    text = "bob@example.com from 10.1.2.3"
    assert scrub_pii(text, ["ip"]) == ("bob@example.com from <IP>", {"ip": 1})


def test_pii_counts_and_examples_hold_no_pii(tmp_path):
    texts = ["write to alice@example.com or call 555-123-4567 for the report", "short bob@x.org"]
    m, ids, rep = run_corpus(tmp_path, texts, bare(min_chars=20, pii=True))
    assert m["pii"] == {"email": 1, "ip": 0, "phone": 1, "secret": 0} and m["changed"]["pii"] == 1
    out = pd.read_parquet(tmp_path / "out.parquet")["text"].tolist()
    assert out == ["write to <EMAIL> or call <PHONE> for the report"]
    shown = json.dumps(rep.examples) + markdown_report([rep])
    assert "alice" not in shown and "bob@" not in shown and "555-123" not in shown
    assert rep.examples["too_short"] == ["d1 (15 chars): 'short <EMAIL>'"]


# ------------------------------------------------------------------------------------------ near-duplicates
def _words(seed: int, n: int = 200) -> list[str]:
    rng = random.Random(seed)
    vocab = ["".join(random.Random(i).choices("abcdefghijklmnopqrstuvwxyz", k=6)) for i in range(2000)]
    return [rng.choice(vocab) for _ in range(n)]


def _jaccard(a: str, b: str) -> float:
    near = NearDuplicates(0.85, 5, 128)
    x, y = set(near.shingles(a)), set(near.shingles(b))
    return len(x & y) / len(x | y)


def test_near_duplicate_removed_unrelated_kept_and_deterministic(tmp_path):
    base = _words(1)
    near = list(base)
    near[60:62] = ["changed", "words"]  # a few edits, as the data bench plants them (Jaccard >= 0.93)
    near[-1] = "last"
    texts = [" ".join(base), " ".join(_words(2)), " ".join(near), "\n".join(base[:100]) + " tail words here"]
    assert 0.93 <= _jaccard(texts[0], texts[2]) < 0.95 and _jaccard(texts[0], texts[3]) < 0.6
    m1, ids1, rep = run_corpus(tmp_path, texts, bare(near_dup=True))
    assert ids1 == ["d0", "d1", "d3"] and m1["removed"]["near_duplicates"] == 1
    assert rep.examples["near_duplicates"][0].startswith(f"d2 (like d0): '{base[0]} ")
    m2, ids2, _ = run_corpus(tmp_path, texts, bare(near_dup=True))
    assert (m1, ids1) == (m2, ids2)


def test_near_duplicate_signatures_are_the_same_in_another_process():
    text = " ".join(_words(5))
    here = NearDuplicates(0.85, 5, 128).band_keys([text]).tolist()
    code = (
        "import json, random\nfrom tasks.shared.cleaning.dedup import NearDuplicates\n"
        f"print(json.dumps(NearDuplicates(0.85, 5, 128).band_keys([{text!r}]).tolist()))"
    )
    res = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == here


def test_texts_shorter_than_a_shingle_are_one_shingle():
    near = NearDuplicates(0.85, 5, 128)
    keep = near.keep(["Hello  World", "hello world", "hello there", "   ", "hello world again and again"])
    assert keep.tolist() == [True, False, True, True, True]
    assert near.twins == {1: 0}
    assert near.keep(["HELLO\nworld", "brand new text"]).tolist() == [False, True]  # against the earlier call


def test_lsh_bands_match_datasketchs_choice():
    assert lsh_bands(0.85, 128) == (8, 16)
    assert lsh_bands(0.8, 128) == (9, 13)
    assert lsh_bands(0.9, 128) == (5, 25)


def test_hash_index_spans_frozen_runs():
    idx = HashIndex(run_keys=4)
    seen = np.array([], np.uint64)
    rng = np.random.default_rng(0)
    for _ in range(6):
        keys = rng.integers(0, 50, 5).astype(np.uint64)
        assert idx.contains(keys).tolist() == np.isin(keys, seen).tolist()
        idx.add(keys)
        seen = np.union1d(seen, keys)
    assert len(idx) == len(seen) and len(idx.frozen) >= 2
    digests = np.array([3, 1, 3, 2, 1], np.uint64)
    assert first_copies(digests, HashIndex()).tolist() == [True, True, False, True, False]


# ------------------------------------------------------------------------------------------ streaming
def test_streaming_in_small_batches_gives_the_same_output(tmp_path):
    texts = [" ".join(_words(i % 7, 30)) + f" {i % 5}" for i in range(40)] + ["tiny", "mail me: a@b.org " + "pad " * 5]
    src = corpus_file(tmp_path, texts, row_group_size=6)
    assert pq.ParquetFile(src).metadata.num_row_groups == 7
    cfg = CleanConfig(min_chars=10, near_dup=True)
    one = clean_file(src, tmp_path / "one.parquet", cfg, "corpus", progress=False)
    many = clean_file(
        src, tmp_path / "many.parquet", cfg.model_copy(update={"batch_rows": 4}), "corpus", progress=False
    )
    assert (
        one == many
        and one["removed"]["duplicates"] == 5
        and one["removed"]["near_duplicates"]
        and one["removed"]["too_short"] == 1
    )
    assert pd.read_parquet(tmp_path / "one.parquet").equals(pd.read_parquet(tmp_path / "many.parquet"))
    assert pq.ParquetFile(tmp_path / "many.parquet").metadata.num_row_groups > 1


def test_progress_bar_counts_bytes_on_stderr(tmp_path, capsys):
    src = corpus_file(tmp_path, ["some text here " * 10] * 3)
    clean_file(src, tmp_path / "o.parquet", bare(), "corpus", progress=True)
    err = capsys.readouterr().err
    assert "clean corpus" in err and "B/s" in err


def test_a_file_without_id_or_kind_gets_row_number_ids(tmp_path):
    src = tmp_path / "old.parquet"
    pd.DataFrame({"text": ["first text", "second text"], "source": ["a", "b"]}).to_parquet(src, index=False)
    clean_file(src, tmp_path / "o.parquet", bare(), "corpus", progress=False)
    out = pd.read_parquet(tmp_path / "o.parquet")
    assert out.columns.tolist() == ["id", "text", "source"] and out["id"].tolist() == ["0", "1"]


# ------------------------------------------------------------------------------------------ labels
def labeled_file(tmp_path, rows: list[tuple[str, str, str]]):
    f = tmp_path / "labeled.parquet"
    df = pd.DataFrame(rows, columns=["text", "label", "split"])
    df.insert(0, "id", [f"r{i}" for i in range(len(df))])
    df["source"] = "s.py"
    df.to_parquet(f, index=False)
    return f


def test_conflicting_labels_remove_every_copy(tmp_path):
    same = "def same():\n    return 'one text'"
    src = labeled_file(
        tmp_path,
        [
            (same, "a", "train"),
            ("def other():\n    return 2", "b", "train"),
            (same + "  ", "b", "val"),
            (same, "a", "test"),
        ],
    )
    m = clean_file(src, tmp_path / "o.parquet", bare(exact_dedup=True), "labeled", progress=False)
    assert m["removed"]["label_conflicts"] == 3 and m["output_rows"] == 1
    assert pd.read_parquet(tmp_path / "o.parquet")["id"].tolist() == ["r1"]
    rep = clean_to(src, tmp_path / "p.parquet", bare(), "labeled")
    assert rep.examples["label_conflicts"] == [f"r0 ('a' (r0) vs 'b' (r2)): {same!r}"]


def test_labels_are_cased_stripped_and_aliased_before_conflicts(tmp_path):
    text = "the same review text"
    rows = [
        (text, " Neg ", "train"),
        (text, "negative", "val"),
        ("a  good   one", "POS", "train"),
        ("a bad one", "neutral  x", "test"),
    ]
    cfg = bare(exact_dedup=True, label_case="lower", label_aliases={"NEG": "negative", "pos": "positive"})
    rep = clean_to(labeled_file(tmp_path, rows), tmp_path / "o.parquet", cfg, "labeled")
    out = pd.read_parquet(tmp_path / "o.parquet")
    assert out["label"].tolist() == ["negative", "positive", "neutral x"]  # train first
    assert (
        rep.removed["label_conflicts"] == 0
        and rep.removed["duplicates"] == 1
        and rep.extra["cross_split_duplicates"] == 1
    )
    assert rep.changed["label_normalized"] == 3
    assert rep.examples["label_normalized"][0] == "r0 (' Neg ' -> 'negative'): 'the same review text'"


def test_run_prefers_the_training_copy_of_a_duplicate(tiny_project):
    text = "def shared():\n    return 'same text in two splits'"
    labeled = pd.DataFrame(
        {
            "text": [text, text, "def only_val():\n    return 'unique text'"],
            "label": ["a", "a", "b"],
            "source": ["test.py", "train.py", "val.py"],
            "split": ["test", "train", "val"],
        }
    )
    corpus = pd.DataFrame({"text": ["a corpus document long enough"], "source": ["train.py"], "kind": ["code"]})
    write_raw(tiny_project, labeled, corpus)
    res = clean.run(CleanConfig(min_chars=10), tiny_project)
    out = pd.read_parquet(tiny_project.clean_labeled)
    assert res.labeled["removed"]["duplicates"] == 1 and res.labeled["cross_split_duplicates"] == 1
    assert res.labeled["removed"]["label_conflicts"] == 0
    assert out.loc[out["text"] == text, "split"].tolist() == ["train"]
    assert res.corpus["output_rows"] == 1


# ------------------------------------------------------------------------------------------ the stage
def test_run_writes_outputs_metrics_report_and_one_line_per_dataset(tiny_project, capsys):
    same = "def same():\n    return 'one text'"
    labeled = pd.DataFrame(
        [
            (same, "a", "a.py", "train"),
            (same, "b", "b.py", "val"),
            ("def other():\n    return 2", "b", "f.py", "val"),
            ("tiny", "a", "g.py", "test"),
        ],
        columns=["text", "label", "source", "split"],
    )
    corpus = pd.DataFrame(
        {"text": ["a corpus document long enough"] * 2, "source": ["x.py", "y.py"], "kind": ["code"] * 2}
    )
    write_raw(tiny_project, labeled, corpus)
    res = clean.run(CleanConfig(min_chars=10), tiny_project)
    assert res.labeled["removed"]["label_conflicts"] == 2 and res.labeled["removed"]["too_short"] == 1
    assert res.corpus["removed"]["duplicates"] == 1
    numbers = json.dumps(res.metrics)
    assert all(isinstance(v, (int, float)) for d in res.metrics.values() for v in _leaves(d)), numbers
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "clean: corpus: kept 1 of 2 rows (0.0 -> 0.0 MB): 1 duplicates",
        "clean: labeled: kept 1 of 4 rows (0.0 -> 0.0 MB): 1 too_short, 2 label_conflicts",
    ]
    report = tiny_project.clean_report.read_text()
    for key in (
        "normalized",
        "pii",
        "too_short",
        "too_long",
        "too_few_tokens",
        "too_many_tokens",
        "low_alpha",
        "repeated_lines",
        "repeated_chars",
        "duplicates",
        "near_duplicates",
        "label_conflicts",
        "label_normalized",
        "cross_split_duplicates",
    ):
        assert f"| {key} |" in report
    assert "## corpus" in report and "## labeled" in report and "'a' (0) vs 'b' (1)" in report


def _leaves(d: dict):
    for v in d.values():
        yield from _leaves(v) if isinstance(v, dict) else [v]


def test_run_fails_when_everything_is_filtered(tiny_project):
    write_raw(
        tiny_project,
        pd.DataFrame({"text": ["tiny", "wee"], "label": ["a"] * 2, "source": ["s"] * 2, "split": ["train"] * 2}),
        pd.DataFrame({"text": ["a long enough corpus text"], "source": ["s"], "kind": ["code"]}),
    )
    with pytest.raises(UserError) as err:
        clean.run(CleanConfig(min_chars=10), tiny_project)
    assert str(err.value) == "clean: every labeled row was filtered out (2 too_short); check params.yaml clean:"
    assert not tiny_project.clean_labeled.exists() and not tiny_project.clean_corpus.exists()


def test_run_reports_missing_input(tiny_project):
    with pytest.raises(UserError) as err:
        clean.run(CFG, tiny_project)
    assert str(tiny_project.raw_corpus) in str(err.value)


def test_missing_column_is_named(tmp_path):
    src = tmp_path / "l.parquet"
    pd.DataFrame({"text": ["x"], "split": ["train"]}).to_parquet(src)
    with pytest.raises(UserError, match=r"missing column\(s\) \['label'\]"):
        clean_file(src, tmp_path / "o.parquet", bare(), "labeled")


def test_bad_params_are_refused():
    for bad in (
        {"near_dup_threshold": 1.5},
        {"pii_types": ["email", "ssn"]},
        {"min_alpha_ratio": -0.1},
        {"label_case": "title"},
        {"min_tokens": 5, "max_tokens": 2},
        {"unknown": 1},
    ):
        with pytest.raises(ValidationError):
            CleanConfig(**bad)


def test_the_synthetic_fixture_data_keeps_every_row():
    """The tiny pipeline's data is real-looking code: no default filter may thin it out."""
    labeled = tiny_labeled()
    texts = labeled["text"].tolist() + tiny_corpus(labeled)["text"].tolist()
    rep = DatasetReport("x", {})
    cleaner = TextCleaner(TINY_CLEAN, "labeled", rep)
    assert all(cleaner(t, i) is not None for i, t in enumerate(texts)), rep.removed
    assert (
        NearDuplicates(TINY_CLEAN.near_dup_threshold, TINY_CLEAN.near_dup_shingle, TINY_CLEAN.near_dup_num_perm)
        .keep(texts)
        .all()
    )


# ------------------------------------------------------------------------------------------ speed paths and workers
def _mixed_texts(n: int = 700, seed: int = 5) -> list[str]:
    """ASCII code and prose, non-ASCII prose (accents, Cyrillic, CJK, emoji, ligatures, odd spaces), control and
    format characters, planted PII, exact and near copies, and texts each filter removes."""
    rng = random.Random(seed)
    words = [
        "def",
        "return",
        "value",
        "the",
        "data",
        "über",
        "naïve",
        "привет",
        "мир",
        "数据",
        "処理",
        "ﬁle",
        "Ｆｕｌｌ",
        "café",
        "😀",
        "x_1",
        "42",
        "3.14",
        "::",
        "->",
        "==",
        "ёлка",
        "\u00a0",
        "\u3000",
        "\u2028",
    ]
    pii = [
        "alice.b@example.com",
        "10.20.30.40",
        "2001:db8::8a2e:370:7334",
        "(555) 123-4567",
        "+44 20 7946 0958",
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2" * 9,
        'password = "hunter2hunter2"',
        "sk-" + "Zz09" * 6,
        "-----BEGIN RSA PRIVATE KEY-----\nMIIEow\n-----END RSA PRIVATE KEY-----",
        "Почта: иван@пример.рф, ivan@mail.ru",
    ]
    junk = ["\x00", "\x07", "\x85", "\u200b", "\ufeff", "\ue000", "\U000e0041", "\r\n", "\r", "\t", "  \n", "\n\n\n\n"]
    texts: list[str] = []
    for _ in range(n):
        roll = rng.random()
        if texts and roll < 0.06:
            texts.append(rng.choice(texts))  # exact copy
            continue
        if texts and roll < 0.12:
            ws = rng.choice(texts).split(" ")
            ws[rng.randrange(len(ws))] = rng.choice(words)  # near copy (or an exact one, for short texts)
            texts.append(" ".join(ws))
            continue
        ascii_only = rng.random() < 0.5
        parts = [
            rng.choice(words[:5] + words[15:21] if ascii_only else words)
            for _ in range(int(rng.expovariate(1 / 60)) + 1)
        ]
        for _ in range(rng.randint(0, 3)):
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(junk[:2] + junk[7:] if ascii_only else junk))
        if rng.random() < 0.25:
            parts.insert(rng.randrange(len(parts) + 1), rng.choice(pii[:-1] if ascii_only else pii))
        if rng.random() < 0.04:
            parts.append(rng.choice(["=", "ー", "а", "😀", "#"]) * rng.randint(8, 400))  # a run of one character
        if rng.random() < 0.04:
            parts = ["1234 5678 — 90 %"] * rng.randint(3, 30)  # few letters
        if rng.random() < 0.04:
            parts = ["    same line\n"] * rng.randint(2, 20)
        texts.append(rng.choice([" "] * 6 + ["\n", "  "]).join(parts))
    return texts


def _outcome(tmp_path, texts: list[str], cfg: CleanConfig, name: str) -> str:
    """A digest of everything the corpus pass produced: the rows, the metrics, the stdout line and the report."""
    import hashlib

    src = corpus_file(tmp_path, texts, name=f"{name}-raw.parquet")
    rep = clean_to(src, tmp_path / f"{name}.parquet", cfg, "corpus", progress=False)
    out = pq.read_table(tmp_path / f"{name}.parquet")
    body = json.dumps(
        [out.schema.to_string(), out.to_pydict(), rep.metrics(), rep.line(), rep.markdown()], ensure_ascii=False
    )
    return hashlib.sha256(body.encode()).hexdigest()


MIXED_CFG = CleanConfig(min_chars=20, max_chars=1500, min_tokens=3, max_tokens=200, batch_rows=37, workers=1)
MIXED_DIGEST = "b73129603136e18591851464528ba8ce6a636ca2bf1e184e3987ac6bbe6acbaa"
"""_outcome of _mixed_texts() under MIXED_CFG with the first, per-text implementation (a regex per text for each PII
anchor, str.isalpha per character, the exact repeated-character scan for every non-ASCII text): the batch paths
and the workers must not change a byte. Change it only with a behaviour change that a test names."""


def test_batch_paths_give_the_output_of_the_per_text_implementation(tmp_path):
    assert _outcome(tmp_path, _mixed_texts(), MIXED_CFG, "one") == MIXED_DIGEST


def test_workers_give_the_same_output_as_one_process(tmp_path):
    texts = _mixed_texts()
    one = _outcome(tmp_path, texts, MIXED_CFG, "one")
    assert _outcome(tmp_path, texts, MIXED_CFG.model_copy(update={"workers": 2}), "two") == one
    lean = MIXED_CFG.model_copy(update={"near_dup": False, "pii": False, "exact_dedup": False})
    assert _outcome(tmp_path, texts, lean.model_copy(update={"workers": 3}), "three") == _outcome(
        tmp_path, texts, lean, "lean"
    )


def test_a_workers_error_reaches_the_caller():
    import pyarrow as pa

    pool = workers.open_pool(bare(workers=2), pa.string(), 2)
    try:
        with pytest.raises(AttributeError, match="isascii"):
            pool.apply_async(workers.work, ([12], ["d0"], 0)).get(timeout=60)
    finally:
        pool.terminate()
    assert (
        workers.open_pool(bare(workers=2), pa.string(), 1) is None
        and workers.open_pool(bare(workers=1), pa.string(), 9) is None
    )


def test_char_stats_match_their_definitions():
    texts = [t for t in _mixed_texts(300, seed=9) if t] + [
        "é1",
        "a😀b",
        "\U0001d400\U0001d41a 1",
        "ё" * 12 + "\u3000" * 12,
    ]
    letters, nonspace, equal = char_stats(texts)
    assert letters == [sum(map(str.isalpha, t)) for t in texts]
    assert nonspace == [sum(map(len, t.split())) for t in texts]
    for t, n in zip(texts, equal):
        assert char_bound(n, len(t)) >= repeated_char_ratio(t), t


def test_batch_scrubbing_matches_the_per_text_search():
    texts = [normalize_text(t) for t in _mixed_texts(400, seed=13)]
    for types in (PII_TYPES, ["ip", "phone"], ["secret"]):
        kinds = dict.fromkeys(types, 0)
        expected = [pii._scrub(t, kinds, pii._pii_spans(t, kinds)) for t in texts]
        assert scrub_texts(texts, types) == expected
