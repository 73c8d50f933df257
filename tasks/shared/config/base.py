"""What every params.yaml section shares: the base class, `paths`, `tracking`, and the loader.

A stage reads only the sections it declares (`load_stage_params`), so its DVC dependencies are
exactly its own config modules; `tasks.shared.config.params.load_params` validates the whole file, and the
stage harness runs it first (a check that can only refuse, so the dag generator leaves it out of the deps).
The loader refuses a key written twice anywhere in the file (as `dvc repro` does), naming the key and line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from tasks.shared.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class Paths(Section):
    """Every input and output of the pipeline, relative to the project root."""

    user_data: Path
    """Folder for your own corpora and labeled sets (track it with `dvc add`)."""
    raw_corpus: Path
    """Ingested pretraining corpus (parquet: text, source, kind)."""
    raw_labeled: Path
    """Ingested labeled set (parquet: text, label, source, split)."""
    clean_corpus: Path
    """Cleaned pretraining corpus."""
    clean_labeled: Path
    """Cleaned labeled set."""
    clean_report: Path
    """The clean stage's Markdown report: rows each filter removed or changed, why, with examples."""
    kg_raw: Path
    """The user's labeled spans after ingest (parquet: id, text, source, entities, relations as JSON strings);
    an empty table when `ingest.spans` is stdlib."""
    kg_data: Path
    """The knowledge-graph task data: a folder of entities/docs/mentions/relations/facts .parquet (kg_data)."""
    gx: Path
    """The Great Expectations project (File Data Context: suites, validation definitions, checkpoints),
    tracked in git."""
    validation: Path
    """The validation result (deterministic JSON): what downstream stages depend on."""
    data_docs: Path
    """Great Expectations Data Docs (HTML with timestamps: nothing depends on them)."""
    tokenizer: Path
    """Folder holding the trained BPE `tokenizer.json`."""
    tokens: Path
    """Memory-mapped token-id shards of the corpus (train-*.bin, val-*.bin, meta.json)."""
    checkpoints: Path
    """Resumable training checkpoints (git- and DVC-ignored scratch space)."""
    lm: Path
    """Pretrained language model (safetensors + config.json)."""
    classifier: Path
    """Fine-tuned classifier (safetensors + config.json)."""
    baselines: Path
    """Classifiers trained from scratch beside it, one subfolder per baseline (scratch, cnn, gru)."""
    pruned: Path
    """Structurally pruned classifier: fewer heads and MLP channels (prune)."""
    sparse: Path
    """Magnitude-pruned classifier: the same shapes, half its weights zero (sparsify)."""
    distilled: Path
    """Student classifier distilled from the fine-tuned one (distill)."""
    quantized: Path
    """int8 variants, one subfolder each (`int8`, `pruned-int8`, ...) (quantize)."""
    onnx: Path
    """ONNX Runtime variants, one subfolder each (`onnx`, `onnx-int8`, `distilled-onnx`, ...) (onnx)."""
    behavioral: Path
    """Minimum-functionality examples (JSONL: text, label) for the behavioral tests, tracked in git."""
    evaluation: Path
    """Evaluation predictions and plots."""
    kg_model: Path
    """The extractor bundle (weights, config, tokenizer, knowledge base, candidate vectors) and baselines.json
    (kg_train)."""
    kg_evaluation: Path
    """The extractor's test predictions (per-document counts, predictions.parquet) and report.md (kg_evaluate)."""
    kg_graph: Path
    """The knowledge graph: `store/` (a pyoxigraph store) and `graph.nt` (its N-Triples export) (kg_graph)."""
    raw_pairs: Path
    """The alignment task's raw pairs after ingest (parquet: every stdlib function with its docstring, or your
    pairs and documents)."""
    align_data: Path
    """The alignment task data: pairs.parquet (text, code, split) and items.parquet (what the index holds)."""
    align_model: Path
    """The dual encoder bundle (text and code towers, tokenizer) (align_train)."""
    align_index: Path
    """The vector index over every item, its metadata and a BM25 index of the same items (align_index)."""
    align_evaluation: Path
    """The encoder's test rankings and report.md (align_evaluate)."""
    curve: Path
    """The learning curve's test predictions (every model, k and seed) and its chart (curve/dvc.yaml)."""
    metrics: Path
    """Folder of per-stage metrics JSON files (DVC metrics, committed to git)."""
    plots: Path
    """Folder of plot data (CSV) that `dvc plots diff` overlays across commits (committed to git)."""

    @property
    def predictions(self) -> Path:
        """Evaluate's test predictions of every model (a column `pred_<model>` each), which promotion compares."""
        return Path(self.evaluation) / "predictions.parquet"


class TrackingConfig(Section):
    """Where MLflow keeps runs and the model registry (`MLFLOW_TRACKING_URI` overrides `uri`)."""

    uri: str = "sqlite:///mlflow/mlflow.db"
    """MLflow tracking URI; a relative sqlite path is resolved against the project root."""
    artifacts: Path = Path("mlflow/artifacts")
    """Artifact root for new experiments on a local store."""
    experiment: str = "lmforge"
    """MLflow experiment name."""
    registered_model: str = "lmforge-classifier"
    """Name of the registered classifier (task `classification`), which carries its own `champion` alias."""
    extractor_model: str = "lmforge-extractor"
    """Name of the registered extractor (task `kg`: entities, relations, links and the graph built with them)."""
    encoder_model: str = "lmforge-encoder"
    """Name of the registered dual encoder (task `align`: text and code embeddings and the index built with them)."""


def describe(err: ValidationError, source: Path, prefix: str = "") -> str:
    """One line naming the file and the dotted key of the first problem."""
    first = err.errors()[0]
    loc = ".".join([prefix, *map(str, first["loc"])] if prefix else map(str, first["loc"])) or "(top level)"
    msg = first["msg"]
    if first["type"] == "extra_forbidden":
        msg = "unknown section" if not prefix and len(first["loc"]) == 1 else "unknown key"
    elif "input" in first and not isinstance(first["input"], dict):
        msg += f" (got {first['input']!r})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}"


def duplicate_key(root: yaml.Node) -> tuple[str, int, int] | None:
    """The first key written twice in a composed YAML document: (dotted key, its line, the first one's line)."""
    todo: list[tuple[str, yaml.Node]] = [("", root)]
    visited: set[int] = set()  # an alias shares its anchor's node (and may point back at its parent)
    while todo:
        prefix, node = todo.pop(0)
        if id(node) in visited:
            continue
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            todo += [(f"{prefix}[{i}]", child) for i, child in enumerate(node.value)]
        elif isinstance(node, yaml.MappingNode):
            first_line: dict[str, int] = {}
            for key, value in node.value:
                name = f"{prefix}.{key.value}" if prefix else str(key.value)
                if isinstance(key, yaml.ScalarNode) and key.value != "<<":  # `<<` merges may repeat
                    if key.value in first_line:
                        return name, key.start_mark.line + 1, first_line[key.value]
                    first_line[key.value] = key.start_mark.line + 1
                todo.append((name, value))
    return None


def _load_yaml(text: str, path: Path) -> Any:
    """YAML `text` as Python values (pyyaml's safe loader), refusing a key written twice."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if dup := duplicate_key(node):
            key, line, first = dup
            raise UserError(f"{path}: line {line}: {key}: duplicate key (first on line {first})")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_params_file(path: Path | str = DEFAULT_PARAMS) -> dict[str, Any]:
    """The raw mapping in params.yaml; a missing, unreadable or malformed file, or a key written twice, raises
    UserError."""
    path = Path(path)
    try:
        raw = _load_yaml(path.read_text(), path)
    except FileNotFoundError:
        raise UserError(f"{path}: file not found (run from the project root or pass --params)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} invalid YAML: {getattr(e, 'problem', e)}") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


def load_section(
    raw: dict[str, Any], name: str, config_type: type[Section], source: Path | str = DEFAULT_PARAMS
) -> Section:
    """Validate section `name` of a raw params mapping (absent or empty = the code defaults)."""
    value = raw.get(name)
    if value is None:
        value = {}
    if not isinstance(value, dict):
        raise UserError(f"{source}: {name}: expected a mapping, got {type(value).__name__}")
    try:
        return config_type.model_validate(value)
    except ValidationError as e:
        raise UserError(describe(e, Path(source), name)) from None


@dataclass(frozen=True)
class StageParams:
    """What one stage may read: `paths`, `tracking` and the sections it declared (as attributes)."""

    file: Path
    paths: Paths
    tracking: TrackingConfig
    sections: dict[str, Section] = field(default_factory=dict)

    def __getattr__(self, name: str) -> Section:
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"section {name!r} was not declared by this stage (declared: {sorted(sections)})")


def load_stage_params(path: Path | str, sections: dict[str, type[Section]]) -> StageParams:
    """`paths`, `tracking` and the declared `sections` of params.yaml, each validated. A declared section missing
    from the file is an error (a typo there would otherwise run the stage on the code defaults); `tracking:` may be
    left out (its defaults are the embedded store)."""
    path = Path(path)
    raw = read_params_file(path)
    if "paths" not in raw:
        raise UserError(f"{path}: paths: missing (every input and output is declared there)")
    for name in sections:
        if name not in raw:
            raise UserError(f"{path} has no `{name}:` section (this stage reads it; params.yaml lists every section)")
    return StageParams(
        file=path,
        paths=load_section(raw, "paths", Paths, path),
        tracking=load_section(raw, "tracking", TrackingConfig, path),
        sections={name: load_section(raw, name, t, path) for name, t in sections.items()},
    )
