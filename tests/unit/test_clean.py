"""clean: text normalization rules and exact filter counts."""

from __future__ import annotations

import pandas as pd
import pytest
from conftest import write_raw

from tasks import clean
from tasks.shared.config.clean import CleanConfig
from tasks.shared.errors import UserError

CFG = CleanConfig(unicode_form="NFKC", tab_size=4, min_chars=10, max_chars=50, labeled_max_chars=50)


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


def test_clean_frame_counts_are_exact():
    ok = "def ok():\n    return 1"  # 22 chars
    rows = [
        ok,  # kept
        ok + "   ",  # duplicate of the first after cleaning (trailing spaces)
        ok,  # exact duplicate
        "short",  # too short (5 < 10)
        "x" * 51,  # too long (51 > 50)
        "  \n  tiny \n",  # too short after cleaning ("  tiny")
        "another fine text",  # kept
        "x" * 50,  # exactly max_chars: kept
        "y" * 10,  # exactly min_chars: kept
    ]
    df = pd.DataFrame({"text": rows, "id": range(len(rows))})
    out, counts, examples = clean.clean_frame(df, CFG, max_chars=CFG.max_chars)
    assert counts == {"input": 9, "modified": 2, "too_short": 2, "too_long": 1, "duplicates": 2, "output": 4}
    assert examples == {"too_short": "'short'", "too_long": repr("x" * 30), "duplicates": repr(ok)}
    assert out["id"].tolist() == [0, 6, 7, 8]  # first copy kept, order preserved, other columns carried
    assert out.index.tolist() == [0, 1, 2, 3]
    assert out["text"].tolist() == [ok, "another fine text", "x" * 50, "y" * 10]


def test_clean_frame_uses_the_given_max_chars():
    df = pd.DataFrame({"text": ["z" * 30, "w" * 20]})
    out, counts, _ = clean.clean_frame(df, CFG, max_chars=25)
    assert counts["too_long"] == 1 and out["text"].tolist() == ["w" * 20]


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
    tiny_project.raw_labeled.parent.mkdir(parents=True)
    labeled.to_parquet(tiny_project.raw_labeled, index=False)
    corpus.to_parquet(tiny_project.raw_corpus, index=False)
    res = clean.run(CleanConfig(min_chars=10), tiny_project)
    out = pd.read_parquet(tiny_project.clean_labeled)
    assert res.labeled["duplicates"] == 1 and res.labeled["cross_split_duplicates"] == 1
    assert res.labeled["label_conflicts"] == 0
    assert out.loc[out["text"] == text, "split"].tolist() == ["train"]
    assert res.corpus["output"] == 1


def test_duplicates_with_another_label_or_split_are_counted_and_reported(tiny_project, capsys):
    same = "def same():\n    return 'one text'"
    rows = [
        (same, "a", "a.py", "train"),
        (same, "b", "b.py", "train"),  # another label, same split
        (same + "  ", "a", "c.py", "val"),  # same label, another split (equal after cleaning)
        (same, "b", "d.py", "test"),  # both differ
        (same, "a", "e.py", "train"),  # a plain duplicate
        ("def other():\n    return 2", "b", "f.py", "val"),
        ("tiny", "a", "g.py", "test"),
    ]
    labeled = pd.DataFrame(rows, columns=["text", "label", "source", "split"])
    corpus = pd.DataFrame({"text": ["a corpus document long enough"] * 2, "source": ["x.py", "y.py"], "kind": ["code"] * 2})
    write_raw(tiny_project, labeled, corpus)
    res = clean.run(CleanConfig(min_chars=10), tiny_project)
    assert res.labeled == {
        "input": 7,
        "modified": 1,
        "too_short": 1,
        "too_long": 0,
        "duplicates": 4,
        "label_conflicts": 2,
        "cross_split_duplicates": 2,
        "output": 2,
    }
    assert res.corpus == {"input": 2, "modified": 0, "too_short": 0, "too_long": 0, "duplicates": 1, "output": 1}
    out = pd.read_parquet(tiny_project.clean_labeled)
    assert out[["label", "source", "split"]].values.tolist() == [["a", "a.py", "train"], ["b", "f.py", "val"]]
    lines = capsys.readouterr().out.splitlines()
    snippet = repr(same[:30])
    assert lines[0] == "clean: corpus: dropped 1 of 2 rows: 1 duplicates (e.g. 'a corpus document long enough' (y.py))"
    assert lines[1] == (
        f"clean: labeled: dropped 5 of 7 rows: 1 too_short (e.g. 'tiny' (g.py)); 4 duplicates (e.g. {snippet} (b.py)); "
        f"2 label_conflicts (e.g. {snippet} (b.py) is 'b', the kept copy (a.py) is 'a'); "
        f"2 cross_split_duplicates (e.g. {snippet} (c.py) is 'val', the kept copy (a.py) is 'train')"
    )
    assert len(lines) == 2


def test_run_fails_when_everything_is_filtered(tiny_project):
    tiny_project.raw_labeled.parent.mkdir(parents=True)
    pd.DataFrame({"text": ["tiny"], "label": ["a"], "source": ["s"], "split": ["train"]}).to_parquet(tiny_project.raw_labeled)
    pd.DataFrame({"text": ["a long enough corpus text"], "source": ["s"], "kind": ["code"]}).to_parquet(tiny_project.raw_corpus)
    with pytest.raises(UserError, match="labeled"):
        clean.run(CleanConfig(min_chars=10), tiny_project)
    assert not tiny_project.clean_labeled.exists() and not tiny_project.clean_corpus.exists()


def test_run_reports_missing_input(tiny_project):
    with pytest.raises(UserError) as err:
        clean.run(CFG, tiny_project)
    assert str(tiny_project.raw_corpus) in str(err.value)
