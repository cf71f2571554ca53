"""One typed configuration, read from one YAML file and overlaid by ``RECSYS_*`` variables.

Nothing here runs at import time: callers build a ``Settings`` with ``load_settings`` and
pass it explicitly. Environment overrides address nested fields with a double underscore,
for example ``RECSYS_VALIDATION__MAX_BAD_FRACTION=0.1``; ``RECSYS_HOME`` moves all runtime
state. The table of bindings is ``Settings.env_bindings()`` and has its own test.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveFloat,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from recsys.layout import CONF_DIR

ENV_PREFIX = "RECSYS_"
DEFAULT_CONFIG_NAME = "recsys.yaml"


class ConfigError(ValueError):
    """A configuration file or override that does not fit the schema."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class GenerateConfig(Section):
    """Defaults of the synthetic generator (the embedded data source)."""

    users: int = Field(2000, ge=1)
    items: int = Field(500, ge=1)
    days: int = Field(30, ge=1)
    seed: int = 7
    # The generated period ends here, not "now": the same seed gives the same files forever.
    end_date: datetime = datetime(2026, 11, 1, tzinfo=UTC)
    events_per_user_day: float = Field(1.2, gt=0)
    late_user_fraction: float = Field(0.15, ge=0, le=1)
    late_item_fraction: float = Field(0.2, ge=0, le=1)


class ValidationConfig(Section):
    """Thresholds of the validation step."""

    # A table whose quarantined fraction exceeds this fails the run.
    max_bad_fraction: float = Field(0.05, ge=0, le=1)
    # Timestamps may lead the run's as-of time by this much (clock skew) before they are bad.
    future_tolerance_seconds: int = Field(300, ge=0)
    # Extra columns in a drop are a schema change: refuse (false) or drop them and warn (true).
    allow_unexpected_columns: bool = False
    rating_min: float = 0.5
    rating_max: float = 5.0
    max_dwell_seconds: float = 6 * 3600.0
    # Where the expectation suites run: pandas in-process, or Spark DataFrames in a session of
    # `spark.master` (the production profile, beside the Spark offline store). Same verdicts
    # and quarantine either way.
    engine: Literal["pandas", "spark"] = "pandas"


class FeaturesConfig(Section):
    online_store: Literal["sqlite", "redis"] = "sqlite"
    # Where training data's point-in-time join runs over the Parquet feature tables. duckdb:
    # Feast's DuckDB offline store, one SQL join in-process (seconds at 200k events); file:
    # Feast's Dask store, which joins in pandas and takes over 10 minutes at that size; spark:
    # Feast's Spark offline store, with materialization on Feast's Spark compute engine, on
    # the cluster of `spark.master` (the production profile). All give the same training
    # rows and values.
    offline_store: Literal["file", "duckdb", "spark"] = "duckdb"
    redis_connection_string: str = "127.0.0.1:6379"
    # Every call to the online store's Redis ends within these (a hung or paused server costs
    # a request its feature deadline and the push thread one timeout, never a thread forever).
    # Added to the connection string unless it names them itself.
    redis_socket_timeout_seconds: float = Field(2.0, gt=0)
    redis_connect_timeout_seconds: float = Field(1.0, gt=0)
    windows_days: list[int] = [1, 7, 30]
    recent_items: int = Field(20, ge=1)
    project: str = "recsys"


class SparkConfig(Section):
    """Apache Spark, where the offline store, materialization and validation run on it.

    Used when ``features.offline_store`` is ``spark`` (training data and materialization) and
    ``validation.engine`` is ``spark``. The same jobs run on one machine or a cluster: only
    the master changes.
    """

    # local[2]: a JVM in this process with two task threads; a cluster's URL runs the same
    # jobs there (spark://host:7077, yarn, k8s://https://host:443).
    master: str = "local[2]"
    # The driver's heap. A local master runs every task in the driver, so this bounds the
    # whole job; on a cluster the executors' memory goes in `conf`.
    driver_memory: str = "2g"
    # Shuffle partitions: Spark's default of 200 suits a cluster and costs seconds of task
    # overhead per join on a few cores; a cluster sets its own here or in `conf`.
    shuffle_partitions: int = Field(8, ge=1)
    # Any other Spark properties, as spark-defaults.conf would hold them (spark.executor.memory,
    # spark.hadoop.fs.s3a.*). They win over the fields above.
    conf: dict[str, str] = {}

    def properties(self) -> dict[str, str]:
        """The Spark properties of a session: master, memory, UTC time, then ``conf``."""
        return {
            "spark.master": self.master,
            "spark.driver.memory": self.driver_memory,
            "spark.sql.shuffle.partitions": str(self.shuffle_partitions),
            # Feature timestamps are UTC instants; a session in local time would shift the
            # day of a snapshot and the strictly-before comparisons around midnight.
            "spark.sql.session.timeZone": "UTC",
            "spark.ui.enabled": "false",
            **self.conf,
        }


class SourceConfig(Section):
    """Where the pipeline's ingest step reads from."""

    # synthetic: the seeded generator (embedded default); movielens: a MovieLens folder;
    # parquet: a data folder of users/, items/, events/ written by another system.
    kind: Literal["synthetic", "movielens", "parquet"] = "synthetic"
    path: Path | None = None
    # Add the served traffic exported to the lake (``recsys events export``: the gateway's
    # impressions with their rank and what followed them) to the source's events, so the
    # models learn from what the system showed and what users did with it.
    served_traffic: bool = True


class TrainingConfig(Section):
    """Hyperparameters of the two-tower retriever and the multi-objective ranker.

    Defaults suit a catalog of thousands of items on a CPU; the quality check on MovieLens
    (``bench/quality_check.py``) sets them through the same fields.
    """

    seed: int = 42
    # Output dimension D of both towers (what the index and the gateway see).
    embedding_dim: int = Field(64, ge=2)
    # Width of id embeddings (users, items, history) and of small categorical features.
    id_dim: int = Field(64, ge=1)
    feature_dim: int = Field(8, ge=1)
    text_dim: int = Field(32, ge=1)
    hidden_units: list[int] = [128]
    # Out-of-vocabulary buckets of the id lookups: unseen users and items hash into these.
    num_oov_buckets: int = Field(8, ge=2)
    # Fraction of training examples whose user / item id is replaced by an OOV bucket, so the
    # OOV embeddings learn "an unknown id" and the towers learn to lean on features.
    id_dropout: float = Field(0.1, ge=0, lt=1)
    # Item ids of recent_items the query tower reads (newest first).
    max_history: int = Field(50, ge=1)
    # Where a training example's ``recent_items`` come from. point_in_time: the feature
    # layer's join as of the event (what serving saw then; no leakage). leave_one_out: the
    # user's other positives in the training data, newest first: for data whose order in time
    # carries no meaning, such as a random split of ratings, where the point-in-time history
    # of most examples is a sliver of what the query will hold at serving time.
    history: Literal["point_in_time", "leave_one_out"] = "point_in_time"
    # Train the retriever on a user's first positive per item only (serving filters seen items).
    drop_repeat_positives: bool = True
    # The history table is the candidate item table (true) or a table of its own (false).
    share_item_embeddings: bool = False
    # The query tower also averages the catalog categories of the recent items (a taste profile).
    history_categories: bool = True
    # The retriever's query tower. bag: the mean of the recent items' embeddings (order-free).
    # sequential: a causal self-attention encoder over the recent items in time order
    # (SASRec-style), trained on whole user sequences, every prefix a query, in one pass.
    query_tower: Literal["bag", "sequential"] = "bag"
    # Sequential tower: attention blocks, heads per block (dividing id_dim), dropout, and how
    # many user sequences (windows of max_history + 1 positives) form a batch; a batch then
    # holds up to sequence_batch_size * (max_history + 1) positives, each a query.
    sequence_layers: int = Field(2, ge=1)
    sequence_heads: int = Field(1, ge=1)
    sequence_dropout: float = Field(0.2, ge=0, lt=1)
    sequence_batch_size: int = Field(32, ge=2)
    # Whether the sequential tower reads the time since each recent item (an attention bias
    # per age bucket, TiSASRec-style); off, it reads the order alone (SASRec).
    sequence_item_ages: bool = True
    # Whether the sequential tower's head also reads the mean of the recent items' vectors
    # beside the attention's state: the bag tower's order-free view, where the attention alone
    # reads less of what is not order (BENCHMARKS.md, the shuffled-order control; the
    # sequential protocol chooses it on one MovieLens set and not the other).
    sequence_history_mean: bool = False
    # Negatives of the retriever's sampled softmax. in_batch: the other positives of the batch
    # (popularity-distributed). mixed: those plus ``uniform_negatives`` catalog items drawn
    # uniformly per batch, so the long tail is pushed down too. catalog: every catalog item, the
    # exact softmax (no sampling, no logQ); one candidate-tower pass over the catalog per step,
    # so for catalogs of thousands to tens of thousands of items.
    negatives: Literal["in_batch", "mixed", "catalog"] = "in_batch"
    uniform_negatives: int = Field(256, ge=1)
    # Item-to-item neighbours, a second candidate source (components/training/neighbours.py):
    # an item-item regression (EASE) over the ``neighbour_max_items`` items with the most
    # positives (its cost is cubic in them), its L2 chosen from ``neighbour_l2_grid`` on a
    # validation split of each user's positives; each item keeps ``neighbour_top_k`` weights.
    # How much of the candidate score it gets is the serving policy's, chosen by evaluation.
    item_neighbours: bool = True
    neighbour_l2_grid: list[PositiveFloat] = Field([50.0, 200.0, 500.0, 2000.0], min_length=1)
    neighbour_top_k: int = Field(200, ge=1)
    neighbour_max_items: int = Field(5000, ge=2)
    text_max_tokens: int = Field(20000, ge=100)
    text_sequence_length: int = Field(32, ge=4)
    batch_size: int = Field(512, ge=8)
    epochs: int = Field(20, ge=1)
    learning_rate: float = Field(0.005, gt=0)
    # Softmax temperature over L2-normalized embeddings (cosine / temperature); null: raw dot
    # product without normalization.
    temperature: float | None = Field(0.05, gt=0)
    # Popularity (logQ) correction of in-batch negatives: popular items are over-sampled as
    # negatives, so their logits are lowered by log(sampling probability).
    logq_correction: bool = True
    # A learned per-item prior (from id and content) as an extra embedding coordinate, so the
    # dot product is affinity + prior; the exported D is then embedding_dim + 1.
    item_bias: bool = True
    # The validation split held out of training (early stopping; the evaluation chooses the
    # serving policy on it). time: the last ``validation_fraction`` of the positives by time.
    # random: a seeded ``validation_fraction`` of the (user, item) pairs, for data whose order
    # in time carries no meaning (a random split of ratings).
    validation_fraction: float = Field(0.1, ge=0, lt=1)
    validation_split: Literal["time", "random"] = "time"
    early_stopping_patience: int = Field(2, ge=0)
    # What the retriever's early stopping (and so the refit's epoch count) watches. loss: the
    # validation loss. ndcg: NDCG@10 of each held-out positive ranked against the whole
    # catalog, the user's earlier positives masked (the sequential protocol's measure). Unset:
    # ndcg for the sequential tower, whose loss on ml-latest-small is too flat and noisy to
    # stop on (it stopped at epoch 1, below popularity); loss for the bag tower, where ndcg
    # has not been measured (BENCHMARKS.md, sequential protocol). The ranker watches its loss.
    early_stopping_metric: Literal["loss", "ndcg"] | None = None
    # After early stopping, train again on all events for the best number of epochs.
    refit_on_full: bool = False
    # The pipeline's train step also trains the same recipe on train + the gate's holdout
    # (``<run>/refit/``); evaluation and the gate read the model trained without the
    # holdout, index and push ship the refit one. For static data split at random, where the
    # gate's holdout would otherwise be a tenth of every user's profile the served model
    # never sees. Off by default: with a time split the holdout is the newest days, and the
    # blessed model is then exactly the pushed one.
    refit_on_holdout: bool = False
    ranker_epochs: int = Field(10, ge=1)
    # The ranker reads the windowed counts (user engagement, item popularity over 1/7/30 days).
    # Off for data whose serving time is far from its events (an old rating set scored "now"
    # sees every window empty, unlike any training example).
    ranker_window_features: bool = True
    ranker_hidden_units: list[int] = [128, 64]
    ranker_learning_rate: float = Field(0.003, gt=0)
    # Sampled negatives per positive when the data has no impressions (MovieLens).
    negatives_per_positive: int = Field(4, ge=1)
    # Objectives of the ranker and their weights in the combined score.
    objective_weights: dict[str, float] = {"click": 1.0, "engagement": 0.5}
    # Dwell seconds that count as full engagement (log-scaled below it).
    engagement_dwell_cap_seconds: float = Field(600.0, gt=0)
    # The rank an impression was shown at, as a ranker input in training: a learned bias per
    # objective and rank on the heads' logits, held at ``serving_position`` when scoring, so
    # the heads learn what users like rather than where the old ranking put it (users click
    # the top of a list more whatever it holds). Ranks from ``position_buckets - 1`` on share
    # one bias; an example whose rank was not logged reads none. 0 buckets: no position input.
    position_buckets: int = Field(20, ge=0)
    serving_position: int = Field(0, ge=0)
    # Incremental training (components/training/warm_start.py): start both models from the
    # serving version's weights (old ids keep their rows, new ids get fresh ones) and fit
    # ``incremental_epochs`` on the events after its training interval only. Cheaper per run,
    # but a warm start drifts from what a fresh fit would learn, so a run retrains in full
    # when the serving version's last full retrain is ``full_retrain_every_days`` or more
    # before the run's interval end (and when nothing serves, or it cannot be warm-started:
    # trained by older code without checkpoints, other architecture parameters, or the
    # sequential query tower).
    incremental: bool = False
    incremental_epochs: int = Field(2, ge=1)
    full_retrain_every_days: int = Field(7, ge=1)
    # Processes that train the retriever and the ranker together, data parallel, under
    # tf.distribute.MultiWorkerMirroredStrategy (components/training/multi_worker.py): the train
    # step starts them on loopback, each fits its shard of every batch (batch_size stays the
    # global batch) and the gradients are summed. 1: one process, no strategy. In-batch
    # negatives are those of a worker's share of the batch (batch_size / workers).
    workers: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _heads_divide_width(self) -> TrainingConfig:
        if self.id_dim % self.sequence_heads:
            raise ValueError(
                f"sequence_heads={self.sequence_heads} must divide id_dim={self.id_dim} "
                "(each attention head reads id_dim / sequence_heads dimensions)"
            )
        return self

    @field_validator("objective_weights")
    @classmethod
    def _known_objectives(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"click", "engagement"}
        if unknown or not v:
            raise ValueError(f"objectives must be a non-empty subset of click, engagement; got {sorted(v)}")
        return v


class EvaluationConfig(Section):
    """Offline evaluation of the served system on a holdout, and the gate that blesses a model."""

    # How the holdout is cut. time: the last ``holdout_days`` whole days (new users and new
    # items included: what the next days will bring). random: ``holdout_fraction`` of each
    # user's events at random (seeded), for data whose timestamps mean little, such as a
    # random split of ratings. last_item: each user's last positive (and what followed it)
    # held out; users with a single positive item stay in training.
    split: Literal["time", "random", "last_item"] = "time"
    # The last days of events form the holdout (split: time).
    holdout_days: int = Field(7, ge=1)
    holdout_fraction: float = Field(0.1, gt=0, lt=1)
    split_seed: int = 42
    # A holdout with fewer users holding a relevant item than this is too small to decide:
    # the split falls back to last_item, then random (the manifest and report say so).
    min_holdout_users: int = Field(50, ge=1)
    ks: list[int] = [10, 50, 100]
    # Retrieved candidates the ranker re-ranks in the ``retriever_ranker`` system (the served
    # replay ranks every candidate the gateway retrieves, ``gateway.candidates``).
    rerank_depth: int = Field(200, ge=1)
    # Blend of the re-ranked score: rank-normalized ranker score plus this weight times the
    # rank-normalized retrieval score (0: the ranker alone decides). The fallback for a
    # pushed version without a serving policy, and the weight of ``retriever_ranker``.
    retrieval_weight: float = Field(2.0, ge=0)
    # The fusion weights tried on a validation split carved from the training part (the last
    # ``training.validation_fraction`` of its positives); retrieval order alone (the ranker
    # not served) is always tried beside them. The best on ``gate_metric`` serves.
    fusion_weights: list[float] = [0.0, 0.5, 1.0, 2.0, 4.0]
    # The item-to-item source's shares of the candidate score tried on the same validation
    # split (0, the retriever's candidates alone, is always tried); the best serves.
    neighbour_weights: list[float] = [0.25, 0.5, 0.75, 1.0]
    # The category taste's shares of the candidate score (``recsys.ranking.blend_sources``: how
    # many of the user's recent items share the candidate's category), tried after the
    # neighbour share on the same split (0 always tried); the best serves.
    taste_weights: list[float] = [0.25, 0.5, 0.75, 1.0]
    # What judges the served system where the generator's truth exists (synthetic data):
    # "reward", the expected reward of the top K under the truth, chooses the serving policy
    # and gates against popularity (logged positives carry the old system's exposure, the
    # truth does not; the gate metric is reported beside it); "metric", the gate metric
    # decides and the truth can only veto a step. Without truth the gate metric decides.
    judge: Literal["reward", "metric"] = "reward"
    # Where the truth exists, a ranker that would serve is also played against retrieval order
    # alone over a simulated session of session_requests requests (0: off) by the first
    # session_users validation users: each request retrieves and ranks again for what the
    # session's clicks and passes changed (components/evaluation/session_replay.py).
    session_requests: int = Field(5, ge=0)
    session_users: int = Field(200, ge=1)
    # The metric (slice "all") that gates a model, and which system it is read from. served:
    # what the gateway serves (candidates, seen filter, ranker with the chosen fusion weight,
    # MMR, exploration slots), replayed offline.
    gate_metric: str = "ndcg@10"
    gate_model: Literal["served", "retriever", "retriever_ranker"] = "served"
    # A candidate may trail the serving model's gate metric by at most this much (absolute).
    gate_margin: float = Field(0.02, ge=0)
    # Where the truth judges (``judge: reward``), the candidate is compared with the serving
    # model on expected reward instead, on the same holdout users: it may trail by at most this
    # fraction of the serving model's. The gate metric on logged positives favours the model
    # that chose what was shown, so it cannot tell a retrained model from the one it replaces.
    gate_reward_margin: float = Field(0.02, ge=0, lt=1)
    # Users whose training event count is in this top fraction form the "heavy" slice.
    heavy_user_fraction: float = Field(0.1, gt=0, le=1)
    # Bins of the ranker's reliability table (predicted vs observed click rate).
    calibration_bins: int = Field(10, ge=2)

    @field_validator("gate_metric")
    @classmethod
    def _known_metric(cls, v: str) -> str:
        name, _, k = v.partition("@")
        known = {"recall", "ndcg", "precision", "hit_rate", "mrr"}
        if name not in known or (name != "mrr" and not k.isdigit()):
            raise ValueError(f"unknown metric {v!r}: use recall@K, ndcg@K, precision@K, hit_rate@K or mrr")
        return v

    @field_validator("neighbour_weights", "taste_weights")
    @classmethod
    def _shares(cls, v: list[float], info: ValidationInfo) -> list[float]:
        if any(not 0 < w <= 1 for w in v):
            raise ValueError(f"{info.field_name} must be shares in (0, 1] (0 is always tried); got {v}")
        return sorted(set(v))

    @field_validator("fusion_weights")
    @classmethod
    def _finite_weights(cls, v: list[float]) -> list[float]:
        if not v or any(not 0 <= w < float("inf") for w in v):
            raise ValueError(
                f"fusion_weights must be a non-empty list of finite weights >= 0 (retrieval order "
                f"alone is always tried); got {v}"
            )
        return sorted(set(v))


class IndexConfig(Section):
    """The ANN index over candidate embeddings (ScaNN), tuned to a recall target.

    Parameters derive from the catalog size (``components.indexing.index_params``); the
    knobs here scale that derivation rather than fix absolute numbers, so one setting
    serves a 2k and a 1M catalog.
    """

    # Recall@recall_k against exact (dot product) search below which a build fails.
    recall_target: float = Field(0.95, ge=0, le=1)
    recall_k: int = Field(100, ge=1)
    # Queries sampled to measure recall and latency at every build.
    eval_queries: int = Field(500, ge=10)
    # Below this many items exact search is fast enough and an ANN only costs recall.
    brute_force_below: int = Field(2000, ge=0)
    # Leaves of the k-means partition: leaves_per_sqrt_n * sqrt(N), at most N / 16 (FAISS's
    # guideline for an inverted file is 4 to 16 sqrt(N)). The served search scores every
    # centroid in one matmul and gathers the searched leaves' items, each gathered value dearer
    # than a centroid's, so a finer partition than ScaNN's usual sqrt(N) answers faster at the
    # same recall (BENCHMARKS.md, "in-graph partitioned search").
    leaves_per_sqrt_n: float = Field(4.0, gt=0)
    # Fraction of the leaves ScaNN searches per query, and the floor on that number (the
    # in-graph partitioned search measures its own count at every build).
    leaves_to_search_fraction: float = Field(0.05, gt=0, le=1)
    min_leaves_to_search: int = Field(10, ge=1)
    # Asymmetric hashing: dimensions per 4-bit block (2 is ScaNN's accuracy-friendly choice).
    dimensions_per_block: int = Field(2, ge=1)
    # Exact re-scoring of reorder_multiplier * k hashed candidates before the final top k.
    reorder_multiplier: int = Field(4, ge=1)
    # When the derived setting misses the target: double leaves searched and reorder up to this
    # many times (query-time settings, cheap) before the build fails.
    max_tuning_steps: int = Field(3, ge=0)
    # Std of the noise added to item embeddings (relative to their mean norm) when no real
    # query embeddings are given to measure recall with.
    query_noise: float = Field(0.1, ge=0)
    seed: int = 0


# The index in the retrieval SavedModel (``push.retrieval_index``; components/push.py).
RetrievalIndex = Literal["partitioned", "scann_ops", "exact"]


class PushConfig(Section):
    """Publishing models to TF Serving's layout ``<base>/<model>/<version>/``."""

    # Model base path (what tensorflow_model_server's --model_base_path points under);
    # default <home>/models.
    base_path: Path | None = None
    retrieval_model: str = "retrieval"
    ranking_model: str = "ranking"
    # Candidates the retrieval model returns per query (capped at the catalog size).
    retrieval_k: int = Field(1000, ge=1)
    # Versions kept per model besides the labelled (stable, canary) ones.
    keep_versions: int = Field(3, ge=1)
    # Warm-up PredictionLog records per model (TF Serving reads at most 1000).
    warmup_records: int = Field(32, ge=1, le=1000)
    # How the retrieval SavedModel searches the catalog:
    # - partitioned: the index's ScaNN leaves searched with core TensorFlow ops (centroids,
    #   the best leaves, exact scores of their items), as many leaves as the index step
    #   measured for index.recall_target; stock tensorflow/serving loads it;
    # - scann_ops: ScaNN's own ops in the graph; needs a server built with them
    #   (scann_server_image): stock TF Serving says "Op type not registered 'Scann...'";
    # - exact: a matmul and top-k over every item (core ops; reads the whole catalog per query).
    # An index the step built exact (below index.brute_force_below) is exported exact.
    retrieval_index: RetrievalIndex = "partitioned"
    # The server build that a SavedModel holding ScaNN ops needs (scann_ops only): the optional
    # docker/tf-serving/scann.Dockerfile image at the exporting TensorFlow (google/tf-serving-scann
    # stopped at TF 2.11). Every other export runs on stock tensorflow/serving.
    scann_server_image: str = "recsys-tf-serving-scann:2.20.0"


class GatewayConfig(Section):
    """The recommendation gateway (``recsys serve gateway``): where models are, budgets, policy.

    A request is answered within ``feature_timeout_ms + 2 * model_timeout_ms`` plus local
    work even when a dependency hangs: each dependency has a deadline, and a miss moves the
    request down ``fallback_chain`` (each step counted in ``/metrics``) instead of failing.
    """

    model_server_host: str = "127.0.0.1"
    model_server_grpc_port: int = Field(8500, ge=1, le=65535)
    model_server_rest_port: int = Field(8501, ge=1, le=65535)
    # gRPC carries the 1000-row ranking batch as typed tensors; REST as JSON (slower to encode).
    protocol: Literal["grpc", "rest"] = "grpc"
    feature_timeout_ms: float = Field(50.0, gt=0)
    model_timeout_ms: float = Field(200.0, gt=0)
    # Candidates retrieved per request (the ranker scores all that survive filtering).
    candidates: int = Field(1000, ge=1)
    # Items the item-to-item source adds from the user's recent items (when the pushed serving
    # policy gives it a share); they are ranked with the retrieved candidates.
    neighbour_candidates: int = Field(200, ge=1)
    # Users with fewer events than this get segment popularity blended with content neighbours.
    cold_start_min_events: int = Field(3, ge=0)
    # The user feature that defines a popularity segment (a user_profile feature).
    segment_feature: str = "country"
    # Days of logged events that popularity counts (segment and global).
    popularity_days: int = Field(30, ge=1)
    # MMR: 1.0 is pure relevance, 0.0 pure novelty; MMR re-orders the top mmr_depth ranked items.
    mmr_trade_off: float = Field(0.7, ge=0, le=1)
    mmr_depth: int = Field(100, ge=1)
    # Session feedback (recsys.ranking.session_feedback): an item served to the user lately
    # and not engaged with is discounted by session_item_decay per time served (1: off); the
    # gateway remembers the last session_shown_items it served each user (0: nothing).
    session_item_decay: float = Field(0.5, gt=0, le=1)
    session_shown_items: int = Field(200, ge=0)
    # New items (published within new_item_days of the newest one, or never shown) get slots.
    exploration_slots: int = Field(1, ge=0)
    exploration_position: int = Field(3, ge=0)
    new_item_days: int = Field(7, ge=0)
    # How the slots' items are chosen (recsys.exploration): uniform at random, epsilon-greedy or
    # Thompson sampling on Beta posteriors of a slot impression's click probability (learned
    # online from posted clicks that carry the request_id), LinUCB on the item's retrieval
    # embedding (one ridge regression shared by all items, so a click teaches about the
    # items near it), or none (no exploration).
    exploration_policy: Literal["uniform", "epsilon_greedy", "thompson", "linucb", "none"] = "uniform"
    exploration_epsilon: float = Field(0.1, ge=0, le=1)
    # LinUCB's weight of the uncertainty bonus (higher: tries unfamiliar directions longer) and
    # its ridge (the prior's precision: higher shrinks theta harder toward 0 on few trials).
    exploration_linucb_alpha: float = Field(1.0, gt=0)
    exploration_linucb_ridge: float = Field(1.0, gt=0)
    # The posteriors' Beta prior, and whether they are per (segment, item) or per item (LinUCB:
    # one regression per segment, or one in all).
    exploration_prior_alpha: float = Field(1.0, gt=0)
    exploration_prior_beta: float = Field(1.0, gt=0)
    exploration_by_segment: bool = True
    # New items a learning policy chooses among per request (a uniform sample when more are new).
    exploration_pool: int = Field(256, ge=1)
    # Arms (and slot impressions waiting for their click) the gateway keeps in memory.
    exploration_max_arms: int = Field(100_000, ge=1)
    # Sticky arms by user hash; stable gets the rest. Holdout gets popularity only.
    arm_fractions: dict[str, float] = {"canary": 0.1, "holdout": 0.05}
    arm_salt: str = "recsys"
    # Objective weights of the ranker's heads; null: the model's own ``score`` (training weights).
    objective_weights: dict[str, float] | None = None
    # Business rules: never recommend these categories, nor out-of-stock items.
    excluded_categories: list[str] = []
    exclude_out_of_stock: bool = True
    default_k: int = Field(10, ge=1)
    max_k: int = Field(100, ge=1)
    max_batch_events: int = Field(500, ge=1)
    # Bounds on a request's lists (the schema's own caps are 1000 and 10000): each filter
    # category is a lookup, each excluded id a set entry, so these bound a request's work.
    max_filter_categories: int = Field(50, ge=1, le=1_000)
    max_exclude_item_ids: int = Field(10_000, ge=0, le=10_000)
    # A posted event may be this far ahead of the gateway's clock (client clock skew); later
    # ones get a 422 naming the value, as the pipeline's validation would quarantine them.
    max_event_future_skew_seconds: float = Field(300.0, ge=0)
    # Requests handled at once; beyond that the gateway answers 503 with Retry-After at once
    # rather than queueing without bound (each request holds a thread and ~1000 candidates).
    max_concurrent_requests: int = Field(64, ge=1)
    # When set, the in-flight bound follows latency between these two (serving.gateway.admission):
    # over each window of finished requests, a p90 above this target cuts it by a fifth, one
    # within it adds one. Past capacity the admitted keep about this latency and the rest are
    # shed, instead of everyone queueing. Off by default: a shared machine's noise (the
    # embedded profile's tests) would shed; the production profile turns it on.
    adaptive_concurrency_target_ms: float | None = Field(None, gt=0)
    min_concurrent_requests: int = Field(4, ge=1)
    # Accepted events waiting for their online-store push (one background thread writes them,
    # so a slow store never holds a request). Beyond this a push is dropped and counted: the
    # event itself is already durable, and the next feature rebuild brings the store up to date.
    push_queue_size: int = Field(10_000, ge=1)
    # Where candidates come from, in order, when the step before fails: the model server's
    # retrieval (ANN), exact search over the version's exported embeddings in the gateway,
    # popularity in the user's segment, global popularity.
    fallback_chain: list[Literal["retrieval", "exact", "segment_popularity", "global_popularity"]] = [
        "retrieval", "exact", "segment_popularity", "global_popularity",
    ]  # fmt: skip
    # The durable event log; default <home>/gateway/events.db.
    event_log_path: Path | None = None
    # Where accepted events and served requests are logged: the embedded SQLite file above, or
    # Redis Streams (production: one log that every gateway replica appends to and the canary
    # analysis reads). Both keep the same promises: idempotent by event_id, durable before a 2xx.
    event_log_backend: Literal["sqlite", "redis_streams"] = "sqlite"
    # redis_streams: the server, as a redis:// URL (a password comes from the environment:
    # RECSYS_GATEWAY__EVENT_LOG_REDIS_URL=redis://:secret@host:6379/0), and the key prefix. The
    # braces make a Redis Cluster hash tag, so the stream and its id index share one slot.
    event_log_redis_url: str = "redis://127.0.0.1:6379/0"
    event_log_key_prefix: str = "{recsys}:eventlog"
    # A 2xx promises the event is on disk: refuse a Redis that does not fsync every write
    # (appendonly yes + appendfsync always). false accepts losing up to a second of events.
    event_log_require_fsync: bool = True
    # Socket and connect timeouts of the event log's Redis client: an append that cannot
    # finish in time answers 503 (nothing was promised), never a request held forever.
    event_log_redis_timeout_seconds: float = Field(10.0, gt=0)
    # How often the item cache checks for a new materialization and new model versions.
    refresh_seconds: float = Field(10.0, gt=0)

    @field_validator("arm_fractions")
    @classmethod
    def _known_arms(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = set(v) - {"canary", "holdout"}
        if unknown or any(not 0 <= f <= 1 for f in v.values()) or sum(v.values()) > 1:
            raise ValueError(f"arm fractions must be canary/holdout in [0, 1] summing to <= 1; got {v}")
        return v

    @field_validator("fallback_chain")
    @classmethod
    def _chain_not_empty(cls, v: list[str]) -> list[str]:
        if not v or len(set(v)) != len(v):
            raise ValueError(f"fallback_chain must be a non-empty list without repeats; got {v}")
        return v


class CanaryConfig(Section):
    """The canary rollout: when a canary model is promoted to stable, or rolled back.

    The gateway serves three arms: ``stable``, ``canary`` (the newest pushed version) and a
    popularity ``holdout``. ``components.canary`` compares the canary's click-through per
    request with stable's (and the holdout's) using one-sided two-proportion z-tests;
    guardrails (error rate, p99 latency) roll back at once. The rule is stated in
    ``components.canary.decide``. Outcomes are read from ``Settings.event_log_path``.
    """

    # One-sided significance level of each test.
    alpha: float = Field(0.05, gt=0, lt=0.5)
    # Below this many requests (or impressions) in the canary or stable arm: wait.
    min_requests_per_arm: int = Field(1000, ge=1)
    min_impressions: int = Field(5000, ge=0)
    # Guardrails on the canary arm: beyond either, roll back without waiting for a sample...
    max_error_rate: float = Field(0.02, ge=0, le=1)
    max_p99_latency_ms: float = Field(250.0, gt=0)
    # A canary request answered from popularity because its model calls failed or timed out
    # (``candidates:segment_popularity|global_popularity|none`` in its fallback) is a failure of
    # the canary even though the user got an answer: beyond this share, roll back at once.
    max_fallback_rate: float = Field(0.05, ge=0, le=1)
    # ...once it has served this many requests (one failure out of one is not a rate).
    guardrail_min_requests: int = Field(20, ge=1)
    # Non-inferiority margin (absolute, in click-through per request): the canary is promoted
    # when it is significantly better than stable's CTR minus this. 0 demands superiority.
    margin: float = Field(0.01, ge=0, lt=1)


class EventExportConfig(Section):
    """The event log's export into the lake and its retention (``recsys events export``).

    Each closed UTC day of logged events becomes ``<home>/lake/events/date=<day>/``; once a
    day's file is durable, that day leaves the log. The canary analysis reads served requests
    and their outcomes from the log, so exported days can stay there a while.
    """

    # Trim the log of exported days (false: export only; the log keeps growing).
    trim: bool = True
    # Closed days kept in the log after their export, for the canary analysis, which reads the
    # log (0: trim a day as soon as it is exported). Served-request records are not trimmed.
    keep_days: int = Field(7, ge=0)


class MonitoringConfig(Section):
    """Drift monitoring (``recsys monitor``, the hourly ``monitoring`` DAG): the latest serving
    window against the training window; a crossed threshold triggers ``training_pipeline``.

    The training window is the last ``training_window_days`` of the latest validated data (what
    the serving models learned from); the serving window is the event log's last
    ``serving_window_hours`` before the run's end. Per feature, the population stability index
    (PSI, ``sum((q - p) * ln(q / p))`` over the feature's bins) is compared with its threshold.
    """

    serving_window_hours: int = Field(24, ge=1)
    training_window_days: int = Field(7, ge=1)
    # PSI above which a feature has drifted (0.1: some shift; 0.25: a large one). Features:
    # category_impressions, category_positives, event_type, device, hour, item_popularity.
    psi_threshold: float = Field(0.2, gt=0)
    # Per-feature thresholds overriding ``psi_threshold`` (feature name -> PSI).
    psi_thresholds: dict[str, float] = {}
    # A feature is judged only with at least this many events in both windows.
    min_events: int = Field(200, ge=1)
    # Drift when click-through per impression (all traffic) moves by more than this fraction
    # of the training window's (0.3: -30% or +30%); 0 turns the check off.
    max_ctr_relative_change: float = Field(0.3, ge=0)
    # Heavy users: the most active fraction of the training window's users.
    heavy_user_fraction: float = Field(0.1, gt=0, le=1)
    # Bins of the training window's item popularity (quantiles) for the served items' PSI.
    popularity_bins: int = Field(10, ge=2)
    # Trigger ``training_pipeline`` when drift is found (false: report only).
    trigger_retraining: bool = True


class SecurityConfig(Section):
    """Who may call the gateway: an API key for writes (and reads, optionally), an admin key
    of its own for admin actions (or the API key where ``admin_key_env`` is null).

    The key itself is never configuration: it is read from the environment variable named
    by ``api_key_env`` when the gateway starts, so it never sits in a YAML file, in
    ``recsys config`` output or in a log. Without that variable the gateway refuses every
    write and admin request (fail closed); ``make demo`` generates a key for its own run.
    """

    # The environment variable holding the API key (sent as the X-API-Key header).
    api_key_env: str = Field("RECSYS_API_KEY", pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # The environment variable holding the admin key (reload, canary promote and rollback), so
    # a client that may post events cannot move models. null: admin actions take the API key
    # (the embedded demo); the production profile names its own, and the gateway refuses to
    # start when both variables hold the same key.
    admin_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # True: recommendations, similar items and /metrics need no key. False: they need it too.
    # /healthz and /readyz stay open for probes either way.
    open_reads: bool = True
    # Request bodies above this are refused with 413 before they are read whole.
    max_request_bytes: int = Field(1_048_576, ge=1024)


class AirflowConfig(Section):
    """Airflow's executor and metadata database, as ``entrypoints.airflow_local`` starts Airflow.

    The embedded default is the LocalExecutor on SQLite under ``<home>/airflow``. Production
    (``conf/production.yaml``) is the CeleryExecutor with a Redis broker, or the
    KubernetesExecutor, on PostgreSQL. Each value becomes an ``AIRFLOW__*`` default; an
    ``AIRFLOW__*`` variable set in the environment still wins. Passwords belong in the
    environment (``RECSYS_AIRFLOW__DATABASE_URL``), not in the file.
    """

    executor: Literal["LocalExecutor", "CeleryExecutor", "KubernetesExecutor"] = "LocalExecutor"
    # SQLAlchemy URL of the metadata DB; null: SQLite under <home>/airflow (Airflow's default).
    database_url: str | None = None
    # CeleryExecutor: where task messages go and where their states come back.
    celery_broker_url: str | None = None
    celery_result_backend: str | None = None
    # Task instances running at once across the deployment (each imports TensorFlow or Feast).
    parallelism: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _executor_needs(self) -> AirflowConfig:
        on_sqlite = not self.database_url or self.database_url.startswith("sqlite")
        if self.executor != "LocalExecutor" and on_sqlite:
            raise ValueError(
                f"airflow.executor={self.executor} needs airflow.database_url on PostgreSQL or MySQL; "
                f"got {self.database_url!r}"
            )
        if self.executor == "CeleryExecutor" and not self.celery_broker_url:
            raise ValueError(
                "airflow.executor=CeleryExecutor needs airflow.celery_broker_url; "
                f"got {self.celery_broker_url!r}"
            )
        return self


class Settings(BaseModel):
    """The whole configuration. ``home`` holds every byte of runtime state."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    home: Path = Field(Path("var"), validate_default=True)
    source: SourceConfig = SourceConfig()
    generate: GenerateConfig = GenerateConfig()
    validation: ValidationConfig = ValidationConfig()
    features: FeaturesConfig = FeaturesConfig()
    spark: SparkConfig = SparkConfig()
    training: TrainingConfig = TrainingConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    index: IndexConfig = IndexConfig()
    push: PushConfig = PushConfig()
    gateway: GatewayConfig = GatewayConfig()
    canary: CanaryConfig = CanaryConfig()
    event_export: EventExportConfig = EventExportConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    airflow: AirflowConfig = AirflowConfig()
    security: SecurityConfig = SecurityConfig()

    @field_validator("home")
    @classmethod
    def _absolute_home(cls, v: Path) -> Path:
        return Path(v).expanduser().resolve()

    # Folders under home. Properties, not fields: they follow `home` when it moves.
    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def raw_dir(self) -> Path:
        return self.data_dir / "raw"

    @property
    def validated_dir(self) -> Path:
        return self.data_dir / "validated"

    @property
    def runs_dir(self) -> Path:
        return self.home / "runs"

    def run_dir(self, run_key: str) -> Path:
        """The versioned folder of one pipeline run (one data interval)."""
        return self.runs_dir / run_key

    @property
    def feast_dir(self) -> Path:
        return self.home / "feast"

    @property
    def models_dir(self) -> Path:
        """TF Serving's model base path: ``<base>/<model>/<version>/`` and ``models.config``."""
        return self.push.base_path or self.home / "models"

    @property
    def event_log_path(self) -> Path:
        """The gateway's durable event log (``gateway.event_log_path`` or ``<home>/gateway/events.db``)."""
        return self.gateway.event_log_path or self.home / "gateway" / "events.db"

    @classmethod
    def env_bindings(cls) -> dict[str, str]:
        """Every environment variable that overrides a leaf field, mapped to its dotted path."""
        bindings: dict[str, str] = {}

        def walk(model: type[BaseModel], prefix: list[str]) -> None:
            for name, info in model.model_fields.items():
                ann = info.annotation
                if isinstance(ann, type) and issubclass(ann, BaseModel):
                    walk(ann, [*prefix, name])
                else:
                    path = [*prefix, name]
                    bindings[ENV_PREFIX + "__".join(p.upper() for p in path)] = ".".join(path)

        walk(cls, [])
        return bindings


def _set_path(tree: dict[str, Any], dotted: str, value: Any) -> None:
    node = tree
    *parents, leaf = dotted.split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{dotted}: parent {p!r} is not a section")
    node[leaf] = value


def load_settings(
    path: Path | str | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Read the YAML file at ``path`` (if any), overlay ``env`` then ``overrides``, validate.

    Args:
        path: a YAML file; None means no file (the built-in defaults).
        env: the environment to read ``RECSYS_*`` overrides from; None reads none. The CLI
            passes ``os.environ``; tests pass a dict.
        overrides: dotted paths to values, applied last (``{"generate.users": 10}``).

    Returns:
        The validated settings.

    Raises:
        ConfigError: naming the file, the field and the value that do not fit.
    """
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: top level must be a mapping")
        tree = loaded
    bindings = Settings.env_bindings()
    for var, value in (env or {}).items():
        if var in bindings:
            # YAML parsing turns "0.1" into a float and "[1, 7]" into a list.
            _set_path(tree, bindings[var], yaml.safe_load(value) if value != "" else None)
        elif var.startswith(ENV_PREFIX) and var not in _NON_FIELD_VARS:
            raise ConfigError(f"unknown environment override {var}; known: {sorted(bindings)}")
    for dotted, value in (overrides or {}).items():
        _set_path(tree, dotted, value)
    try:
        return Settings.model_validate(tree)
    except ValidationError as e:
        where = f" in {path}" if path else ""
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}={err.get('input')!r}: {err['msg']}" for err in e.errors()
        )
        raise ConfigError(f"invalid configuration{where}: {problems}") from None


# Variables with the prefix that are not field overrides: the config file, the API and admin
# keys (secrets, read only by the gateway; see SecurityConfig) and test failpoints.
_NON_FIELD_VARS = {
    "RECSYS_CONFIG", "RECSYS_PROFILE", "RECSYS_API_KEY", "RECSYS_ADMIN_KEY", "RECSYS_FAILPOINTS",
    "RECSYS_API_KEY_FILE", "RECSYS_ADMIN_KEY_FILE",
}  # fmt: skip


# Profiles are conf/<name>.yaml files: RECSYS_PROFILE=production reads conf/production.yaml.


def profile_path(profile: str, cwd: Path | None = None) -> Path:
    """``conf/<profile>.yaml`` under ``cwd``, else in the project's own ``conf/``.

    The project's folder is the fallback so that Airflow tasks and containers, whose working
    directory need not be the repository, find the same profile.

    Raises:
        ConfigError: naming ``RECSYS_PROFILE``, its value and the profiles that exist.
    """
    for conf in ((cwd or Path.cwd()) / "conf", CONF_DIR):
        if (conf / f"{profile}.yaml").is_file():
            return conf / f"{profile}.yaml"
    known = sorted(p.stem for p in CONF_DIR.glob("*.yaml"))
    raise ConfigError(f"RECSYS_PROFILE={profile!r}: no conf/{profile}.yaml; profiles: {known}")


def default_config_path(env: Mapping[str, str], cwd: Path | None = None) -> Path | None:
    """``RECSYS_CONFIG`` if set, else ``RECSYS_PROFILE``'s file, else ``conf/recsys.yaml`` under ``cwd``."""
    if env.get("RECSYS_CONFIG"):
        return Path(env["RECSYS_CONFIG"])
    if env.get("RECSYS_PROFILE"):
        return profile_path(env["RECSYS_PROFILE"], cwd)
    candidate = (cwd or Path.cwd()) / "conf" / DEFAULT_CONFIG_NAME
    return candidate if candidate.is_file() else None


def settings_from_environment(config: Path | None = None) -> Settings:
    """What the CLI does: the given or default config file, overlaid by the process env."""
    env = dict(os.environ)
    return load_settings(config or default_config_path(env), env=env)
