"""The extractor: token spans from offsets, the bundle's round trip, and a tiny multitask training run."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from models.checkpoint import save_lm
from models.extractor import (
    ENTITY_COLUMNS,
    MAX_PAIRS,
    ExtractorConfig,
    ExtractorNet,
    bio_targets,
    decode_tags,
    load_extractor,
    relation_pairs,
    token_span,
)
from models.kb_features import LINK_FEATURES, TOKEN_FEATURES, KnowledgeIndex, candidate_name, parameters
from models.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, load_tokenizer
from models.transformer import GPT, tiny
from tasks.kg import train as kg_train
from tasks.kg.baselines import Baselines, fit_baselines
from tasks.kg.examples import load_task_data
from tasks.shared.config.base import Paths
from tasks.shared.config.kg_train import KgTrainConfig
from tasks.shared.tracking import NullTracker

ROOT = Path(__file__).resolve().parents[2]
EXCEPTIONS = ["ValueError", "KeyError", "TypeError", "OSError"]
WORDS = ["the", "value", "is", "bad", "when", "given", "a", "name", "file", "missing", "list", "empty"]


def kg_tables(n_docs: int = 48, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Synthetic KG-SPEC tables: "Raises <Exception>" mentions that `raises`, ambiguous `Message` classes."""
    rng = random.Random(seed)
    entities = [
        {"id": e, "name": e, "kind": "exception", "module": "builtins", "source": "", "signature": "", "doc": ""}
        for e in EXCEPTIONS
    ] + [
        {
            "id": f"{m}.Message",
            "name": "Message",
            "kind": "class",
            "module": m,
            "source": f"{m}.py",
            "signature": "",
            "doc": f"A {m} message.",
        }
        for m in ("email", "mailbox")
    ]
    docs, mentions, relations = [], [], []
    for i in range(n_docs):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 6)))
        exc, module = rng.choice(EXCEPTIONS), ("email", "mailbox")[i % 2]
        text = f"Return the {words}. Raises {exc} if {words}; builds a Message"
        doc_id = f"{module}.py#{module}.f{i}"
        split = ("train", "train", "val", "test")[i % 4]
        docs.append(
            {
                "id": doc_id,
                "text": text,
                "source": f"{module}.py",
                "module": module,
                "owner": f"{module}.f{i}",
                "split": split,
            }
        )
        s = text.index(exc)
        m = text.index("Message")
        entities.append(
            {
                "id": f"{module}.f{i}",
                "name": f"f{i}",
                "kind": "function",
                "module": module,
                "source": f"{module}.py",
                "signature": "(name, value=None)",
                "doc": "",
            }
        )
        mentions += [
            {"doc_id": doc_id, "m": 0, "start": s, "end": s + len(exc), "label": "exception", "link": exc},
            {"doc_id": doc_id, "m": 1, "start": m, "end": m + 7, "label": "class", "link": f"{module}.Message"},
        ]
        relations += [
            {"doc_id": doc_id, "head": -1, "tail": 0, "label": "raises"},
            {"doc_id": doc_id, "head": -1, "tail": 1, "label": "none"},
        ]
    return {
        "entities": pd.DataFrame(entities),
        "docs": pd.DataFrame(docs),
        "mentions": pd.DataFrame(mentions),
        "relations": pd.DataFrame(relations),
        "facts": pd.DataFrame({"head": ["email.f0"], "relation": ["raises"], "tail": ["ValueError"]}),
    }


def write_tables(folder: Path, tables: dict[str, pd.DataFrame]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, df in tables.items():
        df.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


def train_tokenizer(folder: Path, texts: list[str]) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=300, special_tokens=list(SPECIAL_TOKENS)))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / TOKENIZER_FILE))
    return folder


@pytest.fixture(scope="module")
def kg_project(tmp_path_factory) -> Paths:
    """Tiny task data, tokenizer and LM; Paths pointing at them (outputs under the same temp folder)."""
    base = tmp_path_factory.mktemp("kg")
    tables = kg_tables(96)
    write_tables(base / "kg_data", tables)
    train_tokenizer(base / "tokenizer", tables["docs"]["text"].tolist())
    vocab = load_tokenizer(base / "tokenizer").get_vocab_size()
    torch.manual_seed(0)
    save_lm(GPT(tiny(vocab_size=vocab, block_size=64)), base / "lm")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    raw = {k: str(base / Path(v).name) for k, v in raw.items()}
    raw |= {"kg_data": str(base / "kg_data"), "tokenizer": str(base / "tokenizer"), "lm": str(base / "lm")}
    return Paths.model_validate(raw)


class Recorder(NullTracker):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def log_metrics(self, metrics, step=None) -> None:
        if "train_loss" in metrics:
            self.losses.append(metrics["train_loss"])


@pytest.fixture(scope="module")
def trained(kg_project):
    cfg = KgTrainConfig(
        epochs=15,
        batch_size=8,
        max_length=64,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        link_dim=8,
        description_length=8,
        precision="fp32",
    )
    tracker = Recorder()
    kg_train.LOG_EVERY = 1
    result = kg_train.run(cfg, kg_project, tracker)
    return result, tracker, kg_project


def test_token_span_covers_exactly_the_overlapping_tokens():
    offsets = [(0, 6), (6, 8), (8, 11), (11, 16), (16, 23)]  # "Return| a| Me|ssage| object"
    assert token_span(offsets, (9, 16)) == (2, 4)
    assert token_span(offsets, (7, 8)) == (1, 2)
    assert token_span(offsets, (30, 35)) is None


def test_bio_targets_and_decoding_give_back_the_spans():
    text = "Return a Message object or raise KeyError"
    offsets = [(0, 6), (6, 8), (8, 11), (11, 16), (16, 23), (23, 26), (26, 32), (32, 36), (36, 41)]
    spans = [(9, 16), (33, 41)]
    tags = bio_targets(offsets, spans, [0, 1], len(offsets))
    assert tags == [0, 0, 1, 2, 0, 0, 0, 3, 4]
    probs = np.eye(5)[tags]
    out = decode_tags(text, offsets, probs, ["class", "exception"])
    assert [(s["start"], s["end"], s["label"], s["text"]) for s in out] == [
        (9, 16, "class", "Message"),
        (33, 41, "exception", "KeyError"),
    ]


def test_decoded_spans_are_valid_and_never_overlap_whatever_the_tags():
    rng = np.random.default_rng(0)
    text = "Raise ValueError  when  é the file é is missing"
    offsets = [
        (0, 5),
        (5, 16),
        (16, 18),
        (18, 22),
        (22, 24),
        (24, 25),
        (24, 25),
        (25, 29),
        (29, 34),
        (34, 36),
        (36, 39),
        (39, 47),
    ]  # a multi-byte character split in two tokens with the same offsets
    for _ in range(200):
        probs = rng.random((len(offsets), 7))
        spans = decode_tags(text, offsets, probs, ["a", "b", "c"])
        ends = 0
        for s in spans:
            assert 0 <= s["start"] < s["end"] <= len(text) and s["start"] >= ends
            assert s["text"] == text[s["start"] : s["end"]] and s["text"] == s["text"].strip()
            ends = s["end"]


def test_candidate_name_is_the_last_dotted_component():
    assert candidate_name("email.message.Message") == "Message"
    assert candidate_name(" dumps() ") == "dumps"


def test_config_round_trips_and_refuses_bad_label_sets():
    cfg = ExtractorConfig(tiny(), ["class"], ["none", "raises"])
    assert ExtractorConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.tags == ["O", "B-class", "I-class"]
    with pytest.raises(ValueError):
        ExtractorConfig(tiny(), ["class"], ["raises", "none"])
    with pytest.raises(ValueError):
        ExtractorConfig(tiny(), [], ["none"])


def test_training_on_a_learnable_pattern_lowers_the_loss(trained):
    result, tracker, _ = trained
    first, last = np.mean(tracker.losses[:3]), np.mean(tracker.losses[-3:])
    assert last < 0.5 * first, tracker.losses
    assert result.epochs_run == 15 and 1 <= result.best_epoch <= 15
    assert result.train_links > 0 and result.train_pairs == 2 * result.train_docs


def test_saved_bundle_loads_and_gives_identical_outputs(trained):
    _, _, paths = trained
    a, b = load_extractor(paths.kg_model), load_extractor(paths.kg_model)
    assert a.version == b.version and len(a.version) == 12
    texts = ["Return the bad value. Raises KeyError if empty; builds a Message", "Raises OSError"]
    subjects = ["email.f0", None]
    out = a.extract(texts, subjects)
    assert out == b.extract(texts, subjects)
    spans = [[(e["start"], e["end"], e["label"]) for e in row] for row in a.tag(texts, subjects=subjects)]
    assert spans == [[(e["start"], e["end"], e["label"]) for e in row["entities"]] for row in out]
    with pytest.raises(ValueError):
        a.extract(texts, ["email.f0"])
    alone = [a.extract([t], [s])[0] for t, s in zip(texts, subjects)]  # batched by length, returned in order
    assert [[(e["start"], e["end"], e["label"]) for e in row["entities"]] for row in alone] == [
        [(e["start"], e["end"], e["label"]) for e in row["entities"]] for row in out
    ]
    assert a.entity_labels == ["class", "exception"] and a.relation_labels == ["none", "raises"]
    for text, row in zip(texts, out):
        for e in row["entities"]:
            assert text[e["start"] : e["end"]] == e["text"]
            assert set(e) == {"start", "end", "text", "label", "score", "link", "link_score"}
        for r in row["relations"]:
            assert r["head"] == -1 and 0 <= r["tail"] < len(row["entities"]) and r["label"] != "none"
    net = a.model
    again = ExtractorNet(net.config)
    again.load_state_dict(net.state_dict())
    ids = torch.randint(0, 50, (2, 10))
    torch.testing.assert_close(again(ids, torch.tensor([10, 7])), net(ids, torch.tensor([10, 7])))


def test_linking_picks_one_of_the_candidates_with_a_probability(trained):
    _, _, paths = trained
    ex = load_extractor(paths.kg_model)
    assert ex.link(["Raises KeyError"], [[(7, 15)]]) == [[("KeyError", 1.0)]]  # one candidate
    assert ex.link(["Raises Nothing"], [[(7, 14)]]) == [[("", 0.0)]]
    text = "Return a list. Raises KeyError; builds a Message"
    links = ex.link([text], [[(text.index("Message"), len(text))]])
    assert links[0][0][0] in {"email.Message", "mailbox.Message"} and 0.0 < links[0][0][1] <= 1.0


def test_bundle_holds_the_baselines_fitted_on_train_only(trained):
    _, _, paths = trained
    b = Baselines.load(paths.kg_model)
    train = load_task_data(paths.kg_data).split("train")
    assert b == fit_baselines(train, ["none", "raises"])
    assert b.gazetteer["Message"] == "class"


def kb() -> KnowledgeIndex:
    entities = kg_tables(4)["entities"]
    return KnowledgeIndex(entities, {"Message": {"email.Message": 3, "mailbox.Message": 1}})


def test_parameters_of_a_signature_leave_out_self_and_bad_signatures():
    assert parameters("(self, a, b=None, *args, c, **kw)") == {"a", "b", "args", "c", "kw"}
    assert parameters("(x, /, y: int = 2)") == {"x", "y"}
    assert parameters("") == frozenset() and parameters("(a b)") == frozenset()


def test_token_features_say_what_the_knowledge_base_knows_of_each_identifier():
    index = kb()
    subject = index.subject("email.f0")
    assert (subject.module, subject.kind, subject.params) == ("email", "function", {"name", "value"})
    assert index.subject(None).module == "" and index.subject("nowhere.g").kind_id == 0
    text = "Raises `KeyError` for name; builds a Message"
    offsets = [(0, 6), (6, 8), (8, 11), (11, 16), (16, 17), (17, 21), (21, 26), (26, 27), (27, 34), (34, 36), (36, 44)]
    f = index.token_features(text, offsets, subject)
    col = {name: i for i, name in enumerate(TOKEN_FEATURES)}
    assert f.shape == (len(offsets), len(TOKEN_FEATURES))
    assert f[2:4, col["kind_exception"]].tolist() == [1, 1] and f[2, col["first"]] == 1 and f[3, col["first"]] == 0
    assert f[2, col["marked"]] == 1 and f[2, col["builtin"]] == 1
    assert f[6, col["parameter"]] == 1 and f[6, col["kind_class"]] == 0 and f[5, col["identifier"]] == 1
    assert f[10, col["kind_class"]] == 1 and f[10, col["ambiguous"]] == 1 and f[10, col["same_module"]] == 1
    assert not f[4].any() and not f[7].any()  # a backtick, a semicolon
    assert index.token_features(text, offsets, index.subject(None))[6, col["parameter"]] == 0


def test_link_features_hold_the_train_prior_without_the_example_itself():
    index = kb()
    rows = index.by_name["Message"]
    assert [index.ids[r] for r in rows] == ["email.Message", "mailbox.Message"]
    col = {name: i for i, name in enumerate(LINK_FEATURES)}
    f = index.link_features("Message", rows, index.subject("mailbox.f1"))
    assert f[:, col["same_module"]].tolist() == [0, 1] and f[:, col["prior_share"]].tolist() == [0.75, 0.25]
    held = index.link_features("Message", rows, index.subject("mailbox.f1"), held_out="email.Message")
    assert np.allclose(held[:, col["prior_share"]], [2 / 3, 1 / 3])
    assert index.link_features("mailbox.Message", rows, index.subject(None))[:, col["qualified"]].tolist() == [0, 1]


def test_document_counts_score_an_extractor_on_the_chosen_docs(trained):
    from tasks.kg.scoring import COUNTS, document_counts

    _, _, paths = trained
    ex = load_extractor(paths.kg_model)
    test = [d.id for d in load_task_data(paths.kg_data).split("test")]
    counts = document_counts(ex, Path(paths.kg_data), set(test[:5]))
    assert list(counts.columns) == ["doc_id", *COUNTS] and counts["doc_id"].tolist() == test[:5]
    assert (counts["entity_tp"] + counts["entity_fn"]).tolist() == [2] * 5


PEOPLE, ORGS, CITIES = ["Alice", "Bob", "Carol", "Dave"], ["Acme", "Globex", "Initech"], ["Paris", "Oslo", "Lima"]


def user_span_tables(n_docs: int = 32, seed: int = 0) -> dict[str, pd.DataFrame]:
    """User span data as kg_data writes it: no knowledge base (empty entities), relations between two spans."""
    rng = random.Random(seed)
    docs, mentions, relations = [], [], []
    for i in range(n_docs):
        person, org, city = rng.choice(PEOPLE), rng.choice(ORGS), rng.choice(CITIES)
        text = f"{person} works for {org}, which is based in {city}."
        doc_id = f"user-{i}"
        docs.append({"id": doc_id, "text": text, "source": "spans.jsonl", "module": "", "owner": "", "split": "train"})
        docs[-1]["split"] = ("train", "train", "val", "test")[i % 4]
        for m, (word, label) in enumerate([(person, "person"), (org, "org"), (city, "city")]):
            s = text.index(word)
            mentions.append({"doc_id": doc_id, "m": m, "start": s, "end": s + len(word), "label": label, "link": ""})
        gold = {(0, 1): "works_for", (1, 2): "based_in"}
        for h in range(3):
            for t in range(3):
                if h != t:
                    relations.append({"doc_id": doc_id, "head": h, "tail": t, "label": gold.get((h, t), "none")})
    return {
        "entities": pd.DataFrame({c: pd.Series(dtype=str) for c in ENTITY_COLUMNS}),
        "docs": pd.DataFrame(docs),
        "mentions": pd.DataFrame(mentions),
        "relations": pd.DataFrame(relations),
        "facts": pd.DataFrame({c: pd.Series(dtype=str) for c in ("head", "relation", "tail")}),
    }


@pytest.fixture(scope="module")
def user_trained(tmp_path_factory):
    """A few epochs of a tiny extractor on user span data (empty knowledge base, span-span relations)."""
    base = tmp_path_factory.mktemp("kg_user")
    tables = user_span_tables()
    write_tables(base / "kg_data", tables)
    train_tokenizer(base / "tokenizer", tables["docs"]["text"].tolist())
    torch.manual_seed(0)
    save_lm(GPT(tiny(vocab_size=load_tokenizer(base / "tokenizer").get_vocab_size(), block_size=64)), base / "lm")
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())["paths"]
    raw = {k: str(base / Path(v).name) for k, v in raw.items()}
    raw |= {"kg_data": str(base / "kg_data"), "tokenizer": str(base / "tokenizer"), "lm": str(base / "lm")}
    paths = Paths.model_validate(raw)
    cfg = KgTrainConfig(
        epochs=4,
        batch_size=8,
        max_length=64,
        lr=1e-2,
        min_lr=1e-3,
        warmup_steps=2,
        link_dim=8,
        description_length=8,
        precision="fp32",
    )
    return kg_train.run(cfg, paths, NullTracker()), paths


def test_user_span_data_without_a_knowledge_base_trains_evaluates_and_extracts(user_trained):
    from tasks.kg import evaluate as kg_evaluate
    from tasks.shared.config.kg_evaluate import KgEvaluateConfig

    result, paths = user_trained
    assert result.train_pairs == 6 * result.train_docs and result.train_links == 0
    ex = load_extractor(paths.kg_model)
    assert ex.relation_labels == ["none", "based_in", "works_for"] and ex.model.config.relation_heads == "span"
    texts = ["Bob works for Globex, which is based in Lima.", ""]
    out = ex.extract(texts)
    assert len(out) == 2 and out[1] == {"entities": [], "relations": []}
    for e in out[0]["entities"]:
        assert e["link"] == "" and texts[0][e["start"] : e["end"]] == e["text"]
    assert ex.link([texts[0]], [[(0, 3)]]) == [[("", 0.0)]]
    metrics = kg_evaluate.run(KgEvaluateConfig(), paths, NullTracker())
    assert metrics["test_relations"] == 2 * 8 and 0.0 <= metrics["relation_f1"] <= 1.0


def test_span_span_extraction_relates_ordered_entity_pairs(user_trained):
    _, paths = user_trained
    ex = load_extractor(paths.kg_model)
    text = "Carol works for Acme, which is based in Oslo."
    spans = [(0, 5), (16, 20), (40, 44)]
    out = ex.extract([text])[0]
    found = [(e["start"], e["end"]) for e in out["entities"]]
    assert len(found) >= 2  # so that the pairs below are not vacuous
    pairs = relation_pairs(out["entities"], "span")
    assert all(a != b and 0 <= a < len(found) and 0 <= b < len(found) for a, b in pairs)
    labels = ex.relate([text], [[(found[a], found[b]) for a, b in pairs]])[0]
    expected = [(a, b, lab) for (a, b), (lab, _) in zip(pairs, labels) if lab != "none"]
    assert [(r["head"], r["tail"], r["label"]) for r in out["relations"]] == expected
    assert len(ex.relate([text], [[(spans[0], spans[1]), (None, spans[2])]])[0]) == 2


def test_relation_pairs_are_subject_pairs_or_nearest_ordered_entity_pairs():
    ents = [{"label": "class"}, {"label": "parameter"}, {"label": "exception"}]
    assert relation_pairs(ents, "subject") == [(-1, 0), (-1, 2)]
    assert relation_pairs(ents, "span") == [(0, 1), (1, 0), (1, 2), (2, 1), (0, 2), (2, 0)]
    many = relation_pairs([{"label": "x"}] * 12, "span")
    assert len(many) == MAX_PAIRS == len(set(many)) and many[0] == (0, 1)
    assert {(a, b) for a in range(12) for b in range(12) if 0 < abs(a - b) <= 3} <= set(many)
    assert max(abs(a - b) for a, b in many) == 4
