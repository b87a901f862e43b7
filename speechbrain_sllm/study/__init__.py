"""The paper's study as a package feature: the protocol, stage 1 alignment and reports.

A study recipe prepares its data and says how to load its models; its yaml
declares the stages (``stages``: base scoring, cascade, alignment, one
fine-tuning stage per strategy and mitigation) and ``StudyRunner`` runs them in
order the same way for every study.

Authors
 * speechbrain-sllm developers 2026
"""

from speechbrain_sllm.study.alignment import (
    EmbeddingCTCBrain,
    align_stage,
    read_rows,
    training_targets,
)
from speechbrain_sllm.study.protocol import StudyRunner, free_finished_stage
from speechbrain_sllm.study.report import (
    StageClock,
    hardware,
    importance_shift,
    paired_tests,
    peak_layer,
    print_summary,
    write_align_results,
    write_study_outputs,
    zeroing_line,
)
from speechbrain_sllm.study.settings import (
    AlignmentSettings,
    FinetuneSettings,
    ImportanceSettings,
    StageTraining,
    StudyData,
    StudyModels,
)
from speechbrain_sllm.study.stages import AlignStage, BaseStage, CascadeStage, FinetuneStage

__all__ = [
    "AlignStage",
    "AlignmentSettings",
    "BaseStage",
    "CascadeStage",
    "EmbeddingCTCBrain",
    "FinetuneSettings",
    "FinetuneStage",
    "ImportanceSettings",
    "StageClock",
    "StageTraining",
    "StudyData",
    "StudyModels",
    "StudyRunner",
    "align_stage",
    "free_finished_stage",
    "hardware",
    "importance_shift",
    "paired_tests",
    "peak_layer",
    "print_summary",
    "read_rows",
    "training_targets",
    "write_align_results",
    "write_study_outputs",
    "zeroing_line",
]
