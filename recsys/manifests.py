"""What each pipeline step records about its output: one pydantic model per step's manifest.

A step writes ``manifest.json`` last (``recsys.storage.write_manifest``); the next step, the
gateway and a person read it back as plain JSON. These models are the schema of those
files: a step builds one, and ``model_dump()`` gives exactly the keys and values the file
holds. A field listed in ``omitted_when_none`` is left out of the dump while it is None (the
file has no such key then, rather than a null): the errors of a validation that passed,
the refit of a training run that made none.

Dumps are in Python mode; ``write_manifest`` turns them into JSON as it always has
(``default=str`` for the odd value JSON has no type for), so NaN metrics and the like are
written the same way whether a step hands it a model or a dict.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer


class ManifestModel(BaseModel):
    """A manifest or a part of one: fixed keys, and optional ones left out while None."""

    model_config = ConfigDict(extra="forbid")
    omitted_when_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _leave_out_absent(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        data: dict[str, Any] = handler(self)
        for name in self.omitted_when_none:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class StepManifest(ManifestModel):
    """A step's ``manifest.json``: its presence marks the step's output folder complete."""


class Interval(ManifestModel):
    """A time span as ISO-8601 strings."""

    start: str
    end: str


# --- data folders: ingest, the synthetic generator, the MovieLens import --------------------


class DataFolderManifest(StepManifest):
    """A data folder (users/, items/, events/): where it is and its row counts per table.

    Each source adds what says where the rows came from (``source``, its parameters).
    """

    model_config = ConfigDict(extra="allow")

    path: str
    rows: dict[str, int]


class IngestManifest(DataFolderManifest):
    """``ingest``: the configured source's rows before the run's interval end."""

    source: str
    interval_end: str
    served_events: int = 0  # served traffic from the lake added to the source's events


# --- validate ---------------------------------------------------------------------------------


class ValidatedTable(ManifestModel):
    """One table's counts: every input row is either accepted or quarantined."""

    input: int
    accepted: int
    quarantined: int
    bad_fraction: float
    quarantine_by_rule: dict[str, int]
    dropped_columns: list[str]


class ValidateManifest(StepManifest):
    """``validate``: counts per table, the report, and the errors of a drop that failed."""

    omitted_when_none = frozenset({"errors"})

    step: Literal["validate"] = "validate"
    status: Literal["passed", "failed"]
    input: str
    path: str
    as_of: str
    tables: dict[str, ValidatedTable]
    rows: dict[str, int]
    report: str
    data_docs: str
    code_version: str
    # Where the expectation suites ran (validation.engine): pandas or spark.
    engine: Literal["pandas", "spark"] = "pandas"
    errors: list[str] | None = None


# --- features -----------------------------------------------------------------------------------


class FeatureTableFiles(ManifestModel):
    """The rows and files one feature table was written as."""

    rows: int
    files: list[str]


class FeaturesBuildManifest(StepManifest):
    """``features.build``: the feature tables computed for an interval of days."""

    step: Literal["features.build"] = "features.build"
    path: str
    validated: str
    interval: Interval
    windows_days: list[int]
    recent_items: int
    tables: dict[str, FeatureTableFiles]
    code_version: str


class FeaturesApplyManifest(StepManifest):
    """``features.apply``: what the Feast registry holds after `feast apply`."""

    step: Literal["features.apply"] = "features.apply"
    project: str
    registry: str
    online_store: str
    entities: list[str]
    feature_views: list[str]
    feature_services: list[str]
    removed: list[str]
    code_version: str


class MaterializeManifest(StepManifest):
    """``features.materialize``: the span of feature rows loaded into the online store."""

    step: Literal["features.materialize"] = "features.materialize"
    online_store: str
    interval: Interval
    feature_views: list[str]
    code_version: str


class TrainingDataManifest(StepManifest):
    """``training_data``: the point-in-time training frame, split into train and holdout."""

    step: Literal["training_data"] = "training_data"
    path: str
    rows: dict[str, int]
    split: str
    skipped_views: list[str]
    holdout_starts: str | None
    columns: list[str]


# --- train, evaluate -------------------------------------------------------------------------


class TrainManifest(StepManifest):
    """``train``: the models' inputs, objectives, metrics and example counts.

    ``refit`` names the model trained again on train + holdout, when the run made one: that
    is the model index and push ship.

    ``training_mode`` says how the models were trained (``components.training.warm_start``):
    "full", from scratch, or "incremental", warm-started from ``warm_started_from`` (the
    serving version's training folder) and fitted on ``data_interval`` alone; ``full_retrain_of``
    is the date of the full retrain the models descend from (a full run's own), and
    ``checkpoints`` where the weights and vocabularies a later warm start reads are.
    """

    omitted_when_none = frozenset(
        {"refit", "training_reason", "full_retrain_of", "warm_started_from", "warm_start", "checkpoints"}
    )

    step: Literal["train"] = "train"
    path: str
    embedding_dim: int
    query_inputs: dict[str, str]
    candidate_inputs: dict[str, str]
    ranker_inputs: dict[str, str]
    objectives: list[str]
    objective_weights: dict[str, float]
    metrics: dict[str, Any]
    examples: dict[str, Any]
    data_interval: Interval | None
    parameters: dict[str, Any]
    details: dict[str, Any]
    seed: int
    code_version: str
    refit: dict[str, Any] | None = None
    training_mode: Literal["full", "incremental"] = "full"
    training_reason: str | None = None
    full_retrain_of: str | None = None
    warm_started_from: str | None = None
    # Incremental runs: the events they trained after, epochs, variables copied and tables grown.
    warm_start: dict[str, Any] | None = None
    checkpoints: dict[str, str] | None = None


class Blessing(ManifestModel):
    """The evaluation's verdict (``blessing.json``): may the model replace the serving one?

    ``serving_policy`` is how the model serves (``recsys.ranking.ServingPolicy``: the fusion
    weight chosen on validation, ranker and MMR on or off); push carries it into the version.
    """

    omitted_when_none = frozenset({"serving_policy", "serving_reward"})

    blessed: bool
    reason: str
    metric: str
    model: str
    candidate: float
    popularity: float
    serving: float | None
    margin: float
    # The serving model's expected reward on the same holdout, where the truth judged the gate.
    serving_reward: float | None = None
    serving_policy: dict[str, Any] | None = None


class EvaluateManifest(StepManifest):
    """``evaluate``: metrics per system and slice, the blessing, the split the gate read (and
    the fallback from a holdout too small to decide) and the serving policy chosen."""

    omitted_when_none = frozenset({"split", "serving_policy"})

    step: Literal["evaluate"] = "evaluate"
    path: str
    train_dir: str
    metrics: dict[str, Any]
    blessed: bool
    blessing: Blessing
    report: str
    parameters: dict[str, Any]
    seconds: float
    code_version: str
    split: dict[str, Any] | None = None
    serving_policy: dict[str, Any] | None = None


# --- index ----------------------------------------------------------------------------------------


class RecallQueries(ManifestModel):
    """The queries recall was measured with: real query embeddings or perturbed items."""

    count: int
    source: str
    noise: float | None


class PartitionedSearch(ManifestModel):
    """The in-graph partitioned search over an index's ScaNN leaves: how many leaves a query
    searches (the fewest whose recall@k reaches the target on the recall queries and whose
    leaves hold the gateway's candidates), that recall, and what it costs (items scored per
    query; leaf sizes)."""

    num_leaves: int
    leaves_to_search: int
    # The fewest leaves reaching the recall target; more are searched where those would hold
    # fewer than ``candidates`` items (the gateway's ask) for over 1% of the queries.
    leaves_for_recall: int | None = None
    candidates: int = 0
    recall_at_k: float
    recall_target: float
    items_searched_mean: float
    items_searched_max: int
    leaf_items_mean: float
    leaf_items_max: int
    recall_by_leaves: dict[str, float]  # leaves searched (1, 2, 4, ..., all) -> recall@k


class IndexManifest(StepManifest):
    """``index``: the index built, its parameters and tuning, measured recall and latency."""

    path: str
    train_dir: str
    train_manifest_sha256: str
    train_code_version: str | None
    algorithm: str
    exact: bool
    why: str
    params: dict[str, Any]
    derived_params: dict[str, Any]
    tuning: list[dict[str, Any]]
    num_items: int
    embedding_dim: int
    recall_k: int
    recall_at_k: float
    recall_target: float
    recall_queries: RecallQueries
    build_seconds: float
    latency: dict[str, float]
    exact_qps: float
    files: dict[str, str]
    code_version: str
    # ScaNN indexes only (None, and left out, for an exact one).
    partitioned: PartitionedSearch | None = None

    omitted_when_none = frozenset({"partitioned"})


# --- push -------------------------------------------------------------------------------------------


class ModelVersions(ManifestModel):
    """One model's entry of ``models.config``: its folder, loaded versions and labels."""

    base_path: str
    versions: list[int]
    labels: dict[str, int]


class PushRecord(ManifestModel):
    """``<version>/assets.extra/push.json``: which training output a pushed version holds."""

    version: int
    train_manifest_sha256: str
    train_dir: str
    index_dir: str
    pushed_at: str
    code_version: str
    model: str


class PushManifest(StepManifest):
    """``push``: the version published and labelled ``canary``, and what retention deleted."""

    skipped: Literal[False] = False
    version: int
    base_path: str
    models_config: str
    load_config: str
    train_manifest_sha256: str
    models: dict[str, ModelVersions]
    deleted_versions: dict[str, list[int]]
    exports: dict[str, dict[str, Any]]
    warmup_source: str
    index: dict[str, Any]
    code_version: str


class PushSkippedManifest(StepManifest):
    """``push`` of a training output already pushed: its version, nothing changed."""

    skipped: Literal[True] = True
    reason: str
    version: int
    base_path: str
    models_config: str
    train_manifest_sha256: str
    models: dict[str, ModelVersions]


class PushNotBlessedManifest(StepManifest):
    """``push`` of a run whose model the gate refused: nothing pushed, the gate's reason."""

    step: Literal["push"] = "push"
    path: str
    skipped: Literal[True] = True
    reason: str | None


# --- canary ---------------------------------------------------------------------------------------


class CanaryAnalysis(ManifestModel):
    """A canary analysis (``analysis.json``): the numbers per arm, the tests, the decision."""

    decision: Literal["promote", "rollback", "wait", "noop"]
    reason: str
    guardrails: dict[str, Any]
    tests: dict[str, Any]
    rule: str
    arms: dict[str, dict[str, Any]]
    window: dict[str, str | None]
    serving: dict[str, dict[str, int]] | None
    source: str
    config: dict[str, Any]
    analyzed_at: str


class CanaryDecisionRecord(CanaryAnalysis):
    """One line of ``decisions.jsonl``: what was done, by whom, with the analysis behind it.

    The analysis is taken whole, whatever else it holds.
    """

    model_config = ConfigDict(extra="allow")

    recorded_at: str
    action: str
    decided_by: str
    note: str
    labels: dict[str, Any] | None
    report: str | None
    code_version: str
