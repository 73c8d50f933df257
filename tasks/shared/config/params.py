"""The whole params.yaml as one typed object, for the operations, the flow and the tests.

A stage reads only its own sections (`base.load_stage_params`); the stage harness calls `load_params` first
as a check that can only refuse (tasks/ops/dag.py leaves that import out of the stages' DVC deps, so a change
to another stage's config module does not make every stage stale).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tasks.shared.config.align_data import AlignDataConfig
from tasks.shared.config.align_evaluate import AlignEvaluateConfig
from tasks.shared.config.align_index import AlignIndexConfig
from tasks.shared.config.align_train import AlignTrainConfig
from tasks.shared.config.base import DEFAULT_PARAMS, Paths, Section, TrackingConfig, describe, read_params_file
from tasks.shared.config.clean import CleanConfig
from tasks.shared.config.curve import CurveConfig
from tasks.shared.config.distill import DistillConfig
from tasks.shared.config.evaluate import EvaluateConfig
from tasks.shared.config.finetune import FinetuneConfig
from tasks.shared.config.ingest import IngestConfig, outside_input
from tasks.shared.config.kg_data import KgDataConfig
from tasks.shared.config.kg_evaluate import KgEvaluateConfig
from tasks.shared.config.kg_graph import KgGraphConfig
from tasks.shared.config.kg_train import KgTrainConfig
from tasks.shared.config.onnx import OnnxConfig
from tasks.shared.config.orchestrate import OrchestrateConfig
from tasks.shared.config.pretrain import PretrainConfig
from tasks.shared.config.promote import PromoteConfig
from tasks.shared.config.promote_align import PromoteAlignConfig
from tasks.shared.config.promote_kg import PromoteKgConfig
from tasks.shared.config.prune import PruneConfig
from tasks.shared.config.quantize import QuantizeConfig
from tasks.shared.config.sparsify import SparsifyConfig
from tasks.shared.config.tasks import TasksConfig
from tasks.shared.config.tokenize import TokenizeConfig
from tasks.shared.config.validate import ValidateConfig
from tasks.shared.errors import UserError

SECTION_TYPES: dict[str, type[Section]] = {
    "paths": Paths,
    "tracking": TrackingConfig,
    "tasks": TasksConfig,
    "ingest": IngestConfig,
    "clean": CleanConfig,
    "validate": ValidateConfig,
    "tokenize": TokenizeConfig,
    "kg_data": KgDataConfig,
    "align_data": AlignDataConfig,
    "pretrain": PretrainConfig,
    "finetune": FinetuneConfig,
    "prune": PruneConfig,
    "sparsify": SparsifyConfig,
    "distill": DistillConfig,
    "quantize": QuantizeConfig,
    "onnx": OnnxConfig,
    "evaluate": EvaluateConfig,
    "kg_train": KgTrainConfig,
    "kg_evaluate": KgEvaluateConfig,
    "kg_graph": KgGraphConfig,
    "align_train": AlignTrainConfig,
    "align_index": AlignIndexConfig,
    "align_evaluate": AlignEvaluateConfig,
    "curve": CurveConfig,
    "promote": PromoteConfig,
    "promote_kg": PromoteKgConfig,
    "promote_align": PromoteAlignConfig,
    "orchestrate": OrchestrateConfig,
}
"""Every top-level key of params.yaml and the config class that validates it."""


class Params(BaseModel):
    """The whole params.yaml."""

    paths: Paths
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    tasks: TasksConfig = Field(default_factory=TasksConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    clean: CleanConfig = Field(default_factory=CleanConfig)
    validate_: ValidateConfig = Field(default_factory=ValidateConfig, alias="validate")
    tokenize: TokenizeConfig = Field(default_factory=TokenizeConfig)
    kg_data: KgDataConfig = Field(default_factory=KgDataConfig)
    align_data: AlignDataConfig = Field(default_factory=AlignDataConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    finetune: FinetuneConfig = Field(default_factory=FinetuneConfig)
    prune: PruneConfig = Field(default_factory=PruneConfig)
    sparsify: SparsifyConfig = Field(default_factory=SparsifyConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)
    quantize: QuantizeConfig = Field(default_factory=QuantizeConfig)
    onnx: OnnxConfig = Field(default_factory=OnnxConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    kg_train: KgTrainConfig = Field(default_factory=KgTrainConfig)
    kg_evaluate: KgEvaluateConfig = Field(default_factory=KgEvaluateConfig)
    kg_graph: KgGraphConfig = Field(default_factory=KgGraphConfig)
    align_train: AlignTrainConfig = Field(default_factory=AlignTrainConfig)
    align_index: AlignIndexConfig = Field(default_factory=AlignIndexConfig)
    align_evaluate: AlignEvaluateConfig = Field(default_factory=AlignEvaluateConfig)
    curve: CurveConfig = Field(default_factory=CurveConfig)
    promote: PromoteConfig = Field(default_factory=PromoteConfig)
    promote_kg: PromoteKgConfig = Field(default_factory=PromoteKgConfig)
    promote_align: PromoteAlignConfig = Field(default_factory=PromoteAlignConfig)
    orchestrate: OrchestrateConfig = Field(default_factory=OrchestrateConfig)

    model_config = ConfigDict(extra="forbid", frozen=True)  # `validate_:` in the file is an unknown section

    def section(self, name: str) -> Section:
        """The config of section `name` (params.yaml key)."""
        return self.validate_ if name == "validate" else getattr(self, name)


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate all of params.yaml; a problem raises UserError naming the file and key: a bad value, an
    unknown section or key, a key written twice, or an ingest input outside `paths.user_data` (DVC would not see
    it change). Relative paths are taken from the params file's folder, the project root."""
    path = Path(path)
    raw = read_params_file(path)
    try:
        params = Params.model_validate(raw)
    except ValidationError as e:
        raise UserError(describe(e, path)) from None
    if outside := outside_input(params.ingest, params.paths.user_data, path.parent):
        key, spec = outside
        user_data = params.paths.user_data
        raise UserError(
            f"{path}: ingest.{key}: {spec} is outside paths.user_data ({user_data}), the ingest stage's DVC "
            f"dependency, so its changes would go unseen: move it under {user_data} or point paths.user_data at its "
            "folder"
        )
    return params
