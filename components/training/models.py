"""The Keras models of the recommender: a two-tower retriever and a multi-objective ranker.

A recommender answers in two stages. *Retrieval* narrows a catalog of thousands to millions
of items to a few hundred candidates, fast: a query tower embeds the request (who, what they
just did, when, on which device) and a candidate tower embeds every item offline; the
nearest item embeddings by dot product are the candidates (ScaNN finds them at scale).
*Ranking* then scores each (user, item) candidate pair with richer features (popularity,
the pair's interaction) and predicts several outcomes at once: will the user click, how much
will they engage. A weighted sum of those predictions orders the final list.

Both are ``tfrs.Model`` subclasses built with ``tf_keras`` (Keras 2): TFRS needs it. Import
this module only after ``TF_USE_LEGACY_KERAS=1`` is set (``components.training.train`` does it).

Every lookup (ids, categories, words) lives inside the models, so an exported SavedModel
takes raw strings and numbers: the serving side never needs a vocabulary file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras as keras

from recsys.contracts import CATEGORY_SEPARATOR

MAX_CATEGORIES = 4  # an item has one or two; more are ignored
# Ranker inputs that describe the candidate (besides the item_* counts); the rest are user/context.
ITEM_SIDE_INPUTS = ("item_id", "category")
# A retriever batch encoded ahead of training: the towers' ``encode`` outputs under these keys.
ENCODED_QUERY, ENCODED_CANDIDATE = "encoded_query", "encoded_candidate"
# What the candidate tower reads of an item (train.CANDIDATE_INPUTS, all strings).
CANDIDATE_FEATURES = ("item_id", "category", "title", "description")


def replica_loss(per_example: tf.Tensor) -> tf.Tensor:
    """This replica's share of the mean loss over the global batch (``tf.nn.compute_average_loss``).

    Alone (one replica) it is the batch mean. Under ``tf.distribute`` (``training.workers > 1``)
    each replica holds its slice of the global batch and the optimizer *sums* the replicas'
    gradients, so each divides its examples' sum by the global batch size (its own size times
    the replicas in sync), which Keras does for losses given to ``compile`` but not for a
    TFRS ``compute_loss``. The losses are built with ``reduction=NONE`` for this: Keras
    refuses a batch mean under a strategy. An empty slice (the last batch split unevenly) adds 0.
    """
    return tf.nn.compute_average_loss(per_example)


# What a TFRS model's step logs of its loss: each replica's share under a strategy (``replica_loss``).
# The models here add no regularization losses; one that did would scale them by the replicas in
# sync (``tf.nn.scale_regularization_loss``), as TFRS's step does not.
LOSS_LOGS = ("loss", "regularization_loss", "total_loss")


class ReplicaLogs:
    """Mixin for the ``tfrs.Model``s here: a step's logs read the same with one worker or several.

    TFRS's ``train_step`` / ``test_step`` (kept: ``Model.fit`` runs them through the
    strategy's optimizer path) log the loss a replica computed, which under ``tf.distribute``
    is its share of the global mean (``replica_loss``); Keras metrics (AUC, RMSE) already log
    their value over every replica. Keras then adds the per-worker values up under
    MultiWorkerMirroredStrategy ("auto" reduction), which doubles the metrics with two workers.
    Here the loss shares are summed across the replicas inside the step and Keras takes the
    first replica's logs, so every worker logs (and early-stops on) the same global values.
    """

    @property
    def distribute_reduction_method(self) -> str:
        return "first"  # the logs are already global (see above)

    def train_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return _summed_losses(super().train_step(inputs))  # type: ignore[misc]

    def test_step(self, inputs: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        return _summed_losses(super().test_step(inputs))  # type: ignore[misc]


def _summed_losses(logs: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
    context = tf.distribute.get_replica_context()
    shares = {k: logs[k] for k in LOSS_LOGS if k in logs}
    if context is None or context.num_replicas_in_sync == 1 or not shares:
        return logs
    return {**logs, **context.all_reduce(tf.distribute.ReduceOp.SUM, shares)}


def split_tokens(text: tf.Tensor, max_len: int, sep: str | None = None) -> tf.Tensor:
    """``[B]`` strings -> ``[B, max_len]`` tokens, truncated, padded with "" (the mask token)."""
    ragged = tf.strings.split(text, sep=sep)[:, :max_len]
    return ragged.to_tensor(default_value="", shape=[None, max_len])


def bag_mean(ids: tf.Tensor, table: keras.layers.Embedding) -> tf.Tensor:
    """Mean embedding of a bag of ids ``[B, L]``, ignoring padding (id 0); zeros for an empty bag."""
    emb = table(ids)
    mask = tf.cast(tf.not_equal(ids, 0), emb.dtype)[..., tf.newaxis]
    return tf.reduce_sum(emb * mask, axis=1) / tf.maximum(tf.reduce_sum(mask, axis=1), 1.0)


def id_lookup(vocabulary: Sequence[str], num_oov: int, name: str) -> keras.layers.StringLookup:
    """Ids to indices: 0 is padding (""), 1..num_oov the hashed buckets of unseen ids, then the vocabulary.

    Several OOV buckets rather than one keep unseen ids apart from each other a little (they
    hash to different rows), and id dropout in training teaches those rows what "an id the
    model has not seen" is worth.
    """
    return keras.layers.StringLookup(
        vocabulary=list(vocabulary), mask_token="", num_oov_indices=num_oov, name=name
    )


def drop_ids(indices: tf.Tensor, rate: float, num_oov: int, training: bool | None) -> tf.Tensor:
    """In training, replace a fraction ``rate`` of known ids by an OOV bucket (1..num_oov).

    The bucket is a function of the id (``index % num_oov``), like the hash of a new id. At
    serving no id is dropped.
    """
    if not training or rate <= 0:
        return indices
    known = indices > num_oov
    drop = tf.random.uniform(tf.shape(indices)) < rate
    bucket = 1 + indices % num_oov
    return tf.where(known & drop, bucket, indices)


class CategoricalEmbedding(keras.layers.Layer):
    """A small categorical feature (age bucket, country, device) as an embedding; one OOV row."""

    def __init__(self, vocabulary: Sequence[str], dim: int, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.lookup = keras.layers.StringLookup(vocabulary=list(vocabulary), num_oov_indices=1)
        self.embedding = keras.layers.Embedding(len(vocabulary) + 1, dim)

    def call(self, values: tf.Tensor) -> tf.Tensor:
        return self.embedding(self.lookup(values))


def mlp(units: Sequence[int], out_dim: int | None, name: str) -> keras.Sequential:
    layers: list[keras.layers.Layer] = [keras.layers.Dense(u, activation="relu") for u in units]
    if out_dim is not None:
        layers.append(keras.layers.Dense(out_dim))
    return keras.Sequential(layers, name=name)


class QueryContext(keras.layers.Layer):
    """What both query towers read besides the recent items: user id, profile and request context.

    The user id goes through ``id_lookup`` (hashed OOV buckets for unseen users, id dropout in
    training); the profile features (age bucket, country, device) through one
    ``CategoricalEmbedding`` each; the hour of the request through a 24-row table. ``encode``
    does the string work, ``user`` and ``context`` embed its integers: a tower concatenates
    them with what it makes of the recent items (``QueryTower`` puts its history bag between
    the user and the context, ``SequentialQueryTower`` its sequence state before both).
    """

    def __init__(
        self,
        *,
        users: Sequence[str],
        profile_vocab: Mapping[str, Sequence[str]],
        id_dim: int,
        feature_dim: int,
        num_oov: int,
        id_dropout: float,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.num_oov, self.id_dropout = num_oov, id_dropout
        self.user_lookup = id_lookup(users, num_oov, "user_lookup")
        self.user_embedding = keras.layers.Embedding(len(users) + num_oov + 1, id_dim, name="user_embedding")
        self.profile = {
            name: CategoricalEmbedding(vocab, feature_dim, name=f"{name}_embedding")
            for name, vocab in profile_vocab.items()
        }
        self.hour_embedding = keras.layers.Embedding(24, feature_dim, name="hour_embedding")

    def encode(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """``user_id``, ``hour`` and the profile features -> integer indices (``user``, ``hour``, by name)."""
        return {
            "user": self.user_lookup(features["user_id"]),
            "hour": tf.clip_by_value(tf.cast(features["hour"], tf.int32), 0, 23),
            **{name: layer.lookup(features[name]) for name, layer in self.profile.items()},
        }

    def user(self, encoded: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """The user id's embedding (id dropout in training)."""
        return self.user_embedding(drop_ids(encoded["user"], self.id_dropout, self.num_oov, training))

    def context(self, encoded: Mapping[str, tf.Tensor]) -> list[tf.Tensor]:
        """The hour's embedding, then each profile feature's, in ``profile_vocab`` order."""
        return [
            self.hour_embedding(encoded["hour"]),
            *(layer.embedding(encoded[name]) for name, layer in self.profile.items()),
        ]


def primary_category_table(item_categories: Mapping[str, str]) -> tf.lookup.StaticHashTable:
    """item id -> its primary category, frozen into a model ("" for an unknown item or padding)."""
    return tf.lookup.StaticHashTable(
        tf.lookup.KeyValueTensorInitializer(
            tf.constant(list(item_categories), dtype=tf.string),
            tf.constant(list(item_categories.values()), dtype=tf.string),
        ),
        default_value="",
    )


class HistoryCategories(keras.layers.Layer):
    """The primary categories of a user's recent items: a taste that carries across items of a kind.

    Clicks on three sports items say "sports", whichever items they were. ``ids`` maps item
    ids (any shape) to category indices (0 for padding and unknown items), ``embedding`` is
    their table.
    """

    def __init__(
        self, item_categories: Mapping[str, str], categories: Sequence[str], dim: int, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self.table = primary_category_table(item_categories)
        self.lookup = keras.layers.StringLookup(vocabulary=list(categories), mask_token="", num_oov_indices=1)
        self.embedding = keras.layers.Embedding(len(categories) + 2, dim, name="history_category_embedding")

    def ids(self, items: tf.Tensor) -> tf.Tensor:
        return self.lookup(self.table.lookup(items))


class QueryTower(keras.Model):
    """Embeds a request: user id, profile, the user's recent items and the context.

    A user the model never saw hashes to an OOV bucket; their profile, recent items and
    context still place them (a new user with two clicks already gets a personal query).
    The recent items are averaged item-id embeddings: "more of what you just touched".
    """

    def __init__(
        self,
        *,
        users: Sequence[str],
        item_lookup: keras.layers.StringLookup,
        history_table: keras.layers.Embedding,
        profile_vocab: Mapping[str, Sequence[str]],
        embedding_dim: int,
        id_dim: int,
        feature_dim: int,
        hidden_units: Sequence[int],
        num_oov: int,
        id_dropout: float,
        max_history: int,
        normalize: bool,
        item_bias: bool = False,
        item_categories: Mapping[str, str] | None = None,  # item id -> primary category
        categories: Sequence[str] = (),
    ) -> None:
        super().__init__(name="query_tower")
        self.item_bias, self.max_history, self.normalize = item_bias, max_history, normalize
        self.item_lookup = item_lookup
        self.history_table = history_table
        # The categories of the user's recent items, from a catalog table frozen into the tower.
        self.history_categories = (
            HistoryCategories(item_categories, categories, id_dim, name="history_categories")
            if item_categories
            else None
        )
        self.query_context = QueryContext(
            users=users,
            profile_vocab=profile_vocab,
            id_dim=id_dim,
            feature_dim=feature_dim,
            num_oov=num_oov,
            id_dropout=id_dropout,
            name="query_context",
        )
        self.head = mlp(hidden_units, embedding_dim, "query_mlp")

    def call(self, features: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        return self.embed(self.encode(features), training=training)

    def encode(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The string work: ``QUERY_INPUTS`` -> integer indices (as ``CandidateTower.encode``).

        ``recent_item_ages`` is taken and not read: a bag has no order, and no use for when.
        """
        tokens = split_tokens(features["recent_items"], self.max_history)
        encoded = {"history": self.item_lookup(tokens), **self.query_context.encode(features)}
        if self.history_categories is not None:
            # Primary category of each recent item (0 for padding and unknown items).
            encoded["history_categories"] = self.history_categories.ids(tokens)
        return encoded

    def embed(self, encoded: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """``encode``'s integers -> ``[B, D]`` query embeddings (id dropout in training)."""
        parts = [
            self.query_context.user(encoded, training),
            bag_mean(encoded["history"], self.history_table),
            *self.query_context.context(encoded),
        ]
        if self.history_categories is not None:
            parts.append(bag_mean(encoded["history_categories"], self.history_categories.embedding))
        out = self.head(tf.concat(parts, axis=1))
        out = tf.math.l2_normalize(out, axis=1) if self.normalize else out
        if self.item_bias:
            # A constant last coordinate: its product with the item's bias coordinate adds the
            # bias to every dot product (see CandidateTower).
            out = tf.concat([out, tf.ones_like(out[:, :1])], axis=1)
        return out


def reverse_tokens(text: tf.Tensor, max_len: int) -> tuple[tf.Tensor, tf.Tensor]:
    """``[B]`` newest-first ids -> ``[B, max_len]`` oldest first, right-padded with "", and ``[B]`` counts.

    ``recent_items`` lists the newest item first; a causal encoder reads time forwards. The
    newest ``max_len`` items are kept, then each row is reversed within its own length, so
    position 0 is the oldest kept item and padding stays on the right.
    """
    newest_first = tf.strings.split(text)[:, :max_len]
    lengths = newest_first.row_lengths()
    starts = newest_first.row_starts()
    rows = newest_first.value_rowids()
    within = tf.range(tf.shape(rows, out_type=tf.int64)[0]) - tf.gather(starts, rows)
    flipped = tf.gather(newest_first.values, tf.gather(starts, rows) + tf.gather(lengths, rows) - 1 - within)
    oldest_first = tf.RaggedTensor.from_row_lengths(flipped, lengths)
    return oldest_first.to_tensor(default_value="", shape=[None, max_len]), lengths


# How long ago each recent item was, on a log scale: bucket 0 is "not known" (no time stored),
# bucket k >= 1 holds ages from 2^(k-1) - 1 to 2^k - 1 hours (under an hour, 1-3 hours, 3-7
# hours, ..., about a day in bucket 5, a week in 8, a month in 10, a year in 14), the last
# one everything older than 2^15 - 1 hours (3.7 years).
AGE_BUCKETS = 16
AGE_BOUNDARIES_SECONDS = [3600.0 * (2**k - 1) for k in range(1, AGE_BUCKETS)]


def age_buckets(seconds: tf.Tensor) -> tf.Tensor:
    """Ages in seconds (any shape; negative: not known) -> bucket ids: 0 unknown, 1..AGE_BUCKETS."""
    seconds = tf.cast(seconds, tf.float32)
    bucket = 1 + tf.raw_ops.Bucketize(input=seconds, boundaries=AGE_BOUNDARIES_SECONDS)
    return tf.where(seconds >= 0, bucket, tf.zeros_like(bucket))


def parse_ages(text: tf.Tensor, max_len: int) -> tf.Tensor:
    """``[B]`` space-joined ages in seconds -> ``[B, max_len]`` float64, -1 where missing or not a number.

    A token that is not a plain non-negative number ("-1", "", anything else) reads as
    unknown, so an old request or row without ages gets the unknown bucket, never an error.
    Double precision: differences of ages (``serving_ages``) stay whole seconds, as the
    differences of epoch seconds do in training.
    """
    tokens = split_tokens(text, max_len)
    known = tf.strings.regex_full_match(tokens, r"[0-9]+(\.[0-9]*)?")
    numbers = tf.strings.to_number(tf.where(known, tokens, "0"), tf.float64)
    return tf.where(known, numbers, -tf.ones_like(numbers))


def reverse_within(newest_first: tf.Tensor, counts: tf.Tensor, pad: float) -> tf.Tensor:
    """``[B, M]`` values newest first -> oldest first within each row's first ``counts``, ``pad`` after.

    Aligns a companion of ``recent_items`` (its ages) with ``reverse_tokens``'s output: the
    counts are the items', so ages beyond the items are dropped and missing ones are ``pad``.
    """
    steps = tf.range(tf.shape(newest_first)[1])[tf.newaxis]
    counts = tf.cast(counts, tf.int32)[:, tf.newaxis]
    source = tf.maximum(counts - 1 - steps, 0)
    values = tf.gather(newest_first, source, axis=1, batch_dims=1)
    return tf.where(steps < counts, values, tf.fill(tf.shape(values), tf.cast(pad, values.dtype)))


def pairwise_ages(
    target: tf.Tensor, target_known: tf.Tensor, keys: tf.Tensor, keys_known: tf.Tensor
) -> tf.Tensor:
    """Times of each position's target event and of each position's item -> ``[B, T, T]`` ages.

    ``target`` ``[B, T]``: when the event that query position ``j`` predicts happened;
    ``keys`` ``[B, T]``: when key position ``i``'s item happened (same unit, any origin).
    Entry ``[b, j, i]`` is ``target[j] - keys[i]`` in seconds (clipped at 0) for ``i <= j``
    where both times are known, and -1 (unknown) elsewhere: a position never sees a later one.
    """
    seconds = tf.cast(target, tf.float64)[:, :, tf.newaxis] - tf.cast(keys, tf.float64)[:, tf.newaxis, :]
    steps = tf.shape(target)[1]
    causal = tf.linalg.band_part(tf.ones([steps, steps], tf.bool), -1, 0)[tf.newaxis]  # i <= j
    known = causal & target_known[:, :, tf.newaxis] & keys_known[:, tf.newaxis, :]
    return tf.cast(tf.where(known, tf.maximum(seconds, 0.0), -tf.ones_like(seconds)), tf.float32)


def training_ages(event_time: tf.Tensor) -> tf.Tensor:
    """``[B, T]`` event times of a training window (epoch seconds, -1 unknown) -> ``[B, T, T]`` ages.

    Position ``j`` predicts event ``j`` and has read the start token (position 0, no time)
    and the window's items ``0..j-1`` (at positions ``1..j``): item ``i - 1``'s age at row
    ``j`` is ``event_time[j] - event_time[i - 1]``, measured from the event position ``j``
    predicts, as serving measures the ages from the request (``serving_ages``).
    """
    times = tf.cast(event_time, tf.int64)
    known = times >= 0
    keys = tf.concat([tf.zeros_like(times[:, :1]), times[:, :-1]], axis=1)
    keys_known = tf.concat([tf.zeros_like(known[:, :1]), known[:, :-1]], axis=1)
    return pairwise_ages(times, known, keys, keys_known)


def serving_ages(ages: tf.Tensor, counts: tf.Tensor) -> tf.Tensor:
    """``[B, M]`` recent items' ages (oldest first, -1 unknown), ``[B]`` counts -> ``[B, M + 1, M + 1]``.

    The matrix ``training_ages`` gives the same window: the query row (position ``counts``,
    after the newest item) reads each item's given age, measured from the request; an
    earlier row ``j`` predicted item ``j``, so it reads item ``i - 1``'s age as
    ``ages[i - 1] - ages[j]`` (the time from item ``i - 1`` to item ``j``). Times here are
    minus the ages (the request at 0); rows after the query row are unknown.
    """
    known = ages >= 0
    times = -tf.cast(ages, tf.float64)
    steps = tf.range(tf.shape(ages)[1] + 1)[tf.newaxis]  # [1, M + 1]
    last = tf.cast(counts, tf.int32)[:, tf.newaxis]
    padded_times = tf.concat([times, tf.zeros_like(times[:, :1])], axis=1)
    padded_known = tf.concat([known, tf.zeros_like(known[:, :1])], axis=1)
    target = tf.where(steps == last, tf.zeros_like(padded_times), padded_times)
    target_known = (steps == last) | ((steps < last) & padded_known)
    keys = tf.concat([tf.zeros_like(times[:, :1]), times], axis=1)
    keys_known = tf.concat([tf.zeros_like(known[:, :1]), known], axis=1) & (steps <= last)
    return pairwise_ages(target, target_known, keys, keys_known)


def prefix_means(vectors: tf.Tensor) -> tf.Tensor:
    """``[B, M, d]`` vectors -> ``[B, M + 1, d]``: row ``t`` the mean of the first ``t`` (row 0 zeros).

    Right padding never enters a real position's mean: it comes after every real item.
    """
    sums = tf.concat([tf.zeros_like(vectors[:, :1]), tf.cumsum(vectors, axis=1)], axis=1)
    counts = tf.range(tf.shape(sums)[1], dtype=vectors.dtype)
    return sums / tf.maximum(counts, 1.0)[tf.newaxis, :, tf.newaxis]


class SequentialQueryTower(keras.Model):
    """Embeds a request from the user's items *in order*, with a causal self-attention encoder.

    The recent items (newest ``max_history``, read oldest first after a learned start token)
    go through ``CausalSequenceEncoder``; the state after the newest item is the user's
    sequential taste ("what comes next"). Each item's vector is its id embedding plus its
    primary category's, so taste carries across items of a kind. How long before the
    predicted event each item was (``age_buckets``: log2 hours) enters TiSASRec-style: a
    ``[T, T]`` matrix of age buckets per window (row ``j``: the items position ``j`` reads,
    aged from the event ``j`` predicts) biases every attention logit, and the age of the
    newest item a position has read is embedded and added to its state. An item whose time
    is not known adds nothing (bucket 0), and in training a fraction ``id_dropout`` of the
    items' times is hidden so the tower learns to read such items. The user id, profile and
    request context (hour, device) are concatenated to the state before the head, as in
    ``QueryTower``.

    At serving ``call`` takes the same ``QUERY_INPUTS`` as the bag tower (``recent_items`` a
    newest-first string, ``recent_item_ages`` the seconds since each), so the exported
    SavedModel is a drop-in replacement. In training ``encode_positions`` returns one query
    per position of a sequence, the whole window in one pass: position ``t`` has seen the
    start token and the first ``t`` items, with the context of the event at ``t`` and the
    items' ages measured from that event's time (``training_ages``; serving builds the same
    matrix from the request's ages, ``serving_ages``); a user with no history reads the
    start token alone (profile and context still place them).
    """

    def __init__(
        self,
        *,
        users: Sequence[str],
        item_lookup: keras.layers.StringLookup,
        history_table: keras.layers.Embedding,
        profile_vocab: Mapping[str, Sequence[str]],
        embedding_dim: int,
        id_dim: int,
        feature_dim: int,
        hidden_units: Sequence[int],
        num_oov: int,
        id_dropout: float,
        max_history: int,
        normalize: bool,
        layers: int,
        heads: int,
        dropout: float,
        item_bias: bool = False,
        item_categories: Mapping[str, str] | None = None,  # item id -> primary category
        categories: Sequence[str] = (),
        item_ages: bool = True,
        history_mean: bool = False,
    ) -> None:
        from components.training.sequence import CausalSequenceEncoder

        super().__init__(name="query_tower")
        self.max_history, self.normalize, self.item_bias = max_history, normalize, item_bias
        # Whether the time since each recent item is read (``training.sequence_item_ages``);
        # without it the input is taken and not read, and the tower is plain SASRec.
        self.item_ages = item_ages
        # Whether the head also reads the plain mean of the items read so far
        # (``training.sequence_history_mean``): the bag tower's view beside the attention's.
        self.history_mean = history_mean
        self.item_lookup = item_lookup
        self.history_table = history_table
        self.history_categories = (
            HistoryCategories(item_categories, categories, id_dim, name="history_categories")
            if item_categories
            else None
        )
        # Position 0 of every window: what the encoder reads before the first item.
        self.start_token = self.add_weight(
            name="start_token", shape=(id_dim,), initializer=keras.initializers.RandomNormal(stddev=0.05)
        )
        self.encoder = CausalSequenceEncoder(
            max_history + 1, id_dim, layers, heads, dropout, AGE_BUCKETS, name="sequence"
        )
        self.age_embedding = keras.layers.Embedding(AGE_BUCKETS + 1, id_dim, name="age_embedding")
        self.age_dropout = id_dropout
        self.query_context = QueryContext(
            users=users,
            profile_vocab=profile_vocab,
            id_dim=id_dim,
            feature_dim=feature_dim,
            num_oov=num_oov,
            id_dropout=id_dropout,
            name="query_context",
        )
        self.head = mlp(hidden_units, embedding_dim, "query_mlp")

    def _item_vectors(self, items: tf.Tensor) -> tf.Tensor:
        """Item ids (any shape) -> their id embedding plus their primary category's."""
        vectors = self.history_table(self.item_lookup(items))
        if self.history_categories is not None:
            vectors += self.history_categories.embedding(self.history_categories.ids(items))
        return vectors

    def _age_vectors(self, buckets: tf.Tensor) -> tf.Tensor:
        """Age bucket ids -> their embeddings; zero for an unknown age."""
        known = tf.cast(buckets > 0, self.age_embedding.dtype)[..., tf.newaxis]
        return self.age_embedding(buckets) * known

    def _hide_ages(self, buckets: tf.Tensor, training: bool | None) -> tf.Tensor:
        """In training, a fraction ``id_dropout`` of each window's items lose their time (every row)."""
        if not training or self.age_dropout <= 0:
            return buckets
        shape = tf.shape(buckets)
        hidden = tf.random.uniform([shape[0], 1, shape[2]]) < self.age_dropout
        return tf.where(hidden, tf.zeros_like(buckets), buckets)

    def _states(self, vectors: tf.Tensor, ages: tf.Tensor | None, training: bool | None) -> tf.Tensor:
        """``[B, M, d]`` item vectors oldest first -> ``[B, M + 1, d]`` states (0: the start token alone),
        ``[B, M + 1, 2d]`` with ``history_mean`` (each state followed by ``prefix_means``).

        ``ages``: ``[B, M + 1, M + 1]`` age buckets (``training_ages`` or ``serving_ages``,
        bucketed), or None where no times are known. Each position's state gets the embedding
        of the age of the newest item it has read (the matrix's diagonal).
        """
        start = tf.broadcast_to(self.start_token, [tf.shape(vectors)[0], 1, self.start_token.shape[0]])
        if ages is None or not self.item_ages:
            states = self.encoder(tf.concat([start, vectors], axis=1), training=training)
        else:
            ages = self._hide_ages(ages, training)
            states = self.encoder(tf.concat([start, vectors], axis=1), ages, training=training)
            states += self._age_vectors(tf.linalg.diag_part(ages))
        return tf.concat([states, prefix_means(vectors)], axis=-1) if self.history_mean else states

    def _embed(
        self, states: tf.Tensor, features: Mapping[str, tf.Tensor], training: bool | None
    ) -> tf.Tensor:
        """States ``[B, d]`` or ``[B, T, d]`` + user, profile, context -> query embeddings of the same rank.

        Per-user parts (id, age, country) are ``[B]``; per-event parts (hour, device) match
        the states' rank. Per-user parts are repeated along T.
        """
        encoded = self.query_context.encode(features)
        parts = [self.query_context.user(encoded, training), *self.query_context.context(encoded)]
        if states.shape.rank == 3:
            steps = tf.shape(states)[1]
            parts = [p if p.shape.rank == 3 else tf.repeat(p[:, tf.newaxis], steps, axis=1) for p in parts]
        out = self.head(tf.concat([states, *parts], axis=-1))
        out = tf.math.l2_normalize(out, axis=-1) if self.normalize else out
        if self.item_bias:
            # The constant coordinate that meets the candidate's bias (see CandidateTower).
            out = tf.concat([out, tf.ones_like(out[..., :1])], axis=-1)
        return out

    def encode_positions(self, features: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """One query per position: ``[B, M + 1, D]`` from ``sequence_items`` ``[B, M]`` (oldest first).

        ``hour`` and ``device`` are ``[B, M + 1]``: the context of the event each position
        predicts; ``event_time`` ``[B, M + 1]`` (epoch seconds, -1 unknown) its time. ``user_id``
        and the other profile features are ``[B]``.

        The window goes through the encoder once: row ``t`` of the age matrix
        (``training_ages``) holds the items' ages at event ``t``, so each position reads the
        items before it aged from its own event, as serving reads them at the request's time.
        Without ``event_time`` every age is unknown.
        """
        vectors = self._item_vectors(features["sequence_items"])  # [B, M, d]
        ages = age_buckets(training_ages(features["event_time"])) if "event_time" in features else None
        return self._embed(self._states(vectors, ages, training), features, training)

    def call(self, features: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        items, counts = reverse_tokens(features["recent_items"], self.max_history)
        ages = None
        if "recent_item_ages" in features:
            newest_first = parse_ages(features["recent_item_ages"], self.max_history)
            ages = age_buckets(serving_ages(reverse_within(newest_first, counts, -1.0), counts))
        states = self._states(self._item_vectors(items), ages, training)
        # The state after the newest item: position = number of items read (0: start token).
        newest = tf.gather(states, tf.cast(counts, tf.int32), axis=1, batch_dims=1)
        return self._embed(newest, features, training)


class CandidateTower(keras.Model):
    """Embeds an item from its id, its categories and the words of its title and description.

    The content path (categories, text) is what lets an item nobody has touched yet land
    near its peers: its id falls in an OOV bucket, its words and categories do not.
    """

    def __init__(
        self,
        *,
        item_lookup: keras.layers.StringLookup,
        item_table: keras.layers.Embedding,
        categories: Sequence[str],
        text_vectorizer: keras.layers.TextVectorization,
        embedding_dim: int,
        feature_dim: int,
        text_dim: int,
        hidden_units: Sequence[int],
        num_oov: int,
        id_dropout: float,
        normalize: bool,
        item_bias: bool = False,
    ) -> None:
        super().__init__(name="candidate_tower")
        self.item_bias = item_bias
        self.bias = keras.layers.Dense(1, name="item_bias")
        self.num_oov, self.id_dropout, self.normalize = num_oov, id_dropout, normalize
        self.item_lookup = item_lookup
        self.item_table = item_table
        self.category_lookup = keras.layers.StringLookup(
            vocabulary=list(categories), mask_token="", num_oov_indices=1, name="category_lookup"
        )
        self.category_embedding = keras.layers.Embedding(
            len(categories) + 2, max(feature_dim, text_dim), name="category_embedding"
        )
        self.text_vectorizer = text_vectorizer
        self.text_embedding = keras.layers.Embedding(
            text_vectorizer.vocabulary_size(), text_dim, name="text_embedding"
        )
        self.head = mlp(hidden_units, embedding_dim, "candidate_mlp")

    def call(self, features: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        return self.embed(self.encode(features), training=training)

    def encode(self, features: Mapping[str, tf.Tensor]) -> dict[str, tf.Tensor]:
        """The string work: ``CANDIDATE_INPUTS`` -> item index, category ids ``[B, 4]``, word ids ``[B, L]``.

        No trainable weights and no randomness, so training encodes its examples once and
        feeds ``embed`` integers every step (the same numbers this computes per call).
        """
        return {
            "item": self.item_lookup(features["item_id"]),
            "categories": self.category_lookup(
                split_tokens(features["category"], MAX_CATEGORIES, CATEGORY_SEPARATOR)
            ),
            "words": self.text_vectorizer(tf.strings.join([features["title"], features["description"]], " ")),
        }

    def embed(self, encoded: Mapping[str, tf.Tensor], training: bool | None = None) -> tf.Tensor:
        """``encode``'s integers -> ``[B, D]`` item embeddings (id dropout in training)."""
        item = drop_ids(encoded["item"], self.id_dropout, self.num_oov, training)
        parts = [
            self.item_table(item),
            bag_mean(encoded["categories"], self.category_embedding),
            bag_mean(encoded["words"], self.text_embedding),
        ]
        x = tf.concat(parts, axis=1)
        out = self.head(x)
        out = tf.math.l2_normalize(out, axis=1) if self.normalize else out
        if self.item_bias:
            # The item's prior (how likely anyone picks it, learned from its id and content) as
            # an extra coordinate: dot-product search (exact or ScaNN) then ranks by
            # affinity + prior without any change.
            out = tf.concat([out, self.bias(x)], axis=1)
        return out


class TwoTowerRetriever(ReplicaLogs, tfrs.Model):
    """Two-tower retrieval trained with a sampled softmax over in-batch negatives.

    For each (query, positive item) in a batch, every other item of the batch is a negative.
    Items appear in batches in proportion to their popularity, so the softmax over-penalizes
    popular items; the logQ correction subtracts log(sampling probability) from each logit,
    which makes the loss an unbiased estimate of the full softmax. Accidental hits (the
    positive item appearing again as another row's item) are removed from the negatives.
    """

    def __init__(
        self,
        query_model: QueryTower,
        candidate_model: CandidateTower,
        temperature: float | None,
        logq_correction: bool,
        uniform_negatives: UniformNegatives | CatalogSoftmax | None = None,
    ) -> None:
        super().__init__()
        self.query_model = query_model
        self.candidate_model = candidate_model
        self.logq_correction = logq_correction
        self.uniform_negatives = uniform_negatives
        self.temperature = temperature
        self.task = tfrs.tasks.Retrieval(
            # Per positive; compute_loss takes the mean over the batch (``replica_loss``), so
            # losses read in nats per positive, whatever the batch size.
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=keras.losses.Reduction.NONE
            ),
            temperature=temperature,
            remove_accidental_hits=True,
        )

    def encodes_ahead(self) -> bool:
        """Whether training may feed the towers ``encode``'s integers, encoded once before fitting.

        Both towers must split ``call`` into ``encode`` (strings -> integers) and ``embed``;
        uniform negatives draw raw catalog strings each step, so they keep the string path.
        """
        towers = (self.query_model, self.candidate_model)
        return self.uniform_negatives is None and all(hasattr(t, "encode") for t in towers)

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        if ENCODED_QUERY in features:
            logq = self.logq_correction
            # Encoded ahead (``encodes_ahead``): no string work per step. ``item_key`` is one
            # integer per distinct item id, so accidental hits compare integers, not strings.
            per_example = self.task(
                self.query_model.embed(features[ENCODED_QUERY], training=training),
                self.candidate_model.embed(features[ENCODED_CANDIDATE], training=training),
                candidate_sampling_probability=features["sampling_probability"] if logq else None,
                candidate_ids=features["item_key"],
                compute_metrics=False,
                compute_batch_metrics=False,
            )
            return replica_loss(per_example)
        query = self.query_model(features, training=training)
        return retrieval_loss(
            self.task,
            query,
            self.candidate_model,
            {name: features[name] for name in CANDIDATE_FEATURES},
            features["sampling_probability"],
            self.uniform_negatives,
            self.logq_correction,
            training,
            self.temperature,
        )


class UniformNegatives(keras.layers.Layer):
    """Items drawn uniformly from the whole catalog, added to the in-batch negatives.

    In-batch negatives are as popular as the positives; items in the long tail almost never
    appear as negatives, so the model never learns to push them down and retrieval can
    surface tail items for everyone. A few uniform draws per batch ("mixed negative
    sampling", Yang et al., WWW 2020) cover the tail. The catalog's candidate features are
    constants here; the layer is part of the training model only (the towers are exported).

    Args:
        catalog: candidate feature name -> one value per catalog item.
        probability: each item's share of the training positives (its in-batch sampling
            probability; 0 for items no positive touched).
        count: items drawn per batch.
    """

    def __init__(
        self, catalog: Mapping[str, Sequence[str]], probability: Sequence[float], count: int
    ) -> None:
        super().__init__(name="uniform_negatives")
        self.catalog = {name: tf.constant(list(values), dtype=tf.string) for name, values in catalog.items()}
        self.probability = tf.constant(list(probability), dtype=tf.float32)
        self.count = count
        self.size = len(probability)

    def sample(self) -> tuple[dict[str, tf.Tensor], tf.Tensor]:
        """``count`` items' candidate features and their in-batch sampling probabilities."""
        picks = tf.random.uniform([self.count], maxval=self.size, dtype=tf.int32)
        return {n: tf.gather(v, picks) for n, v in self.catalog.items()}, tf.gather(self.probability, picks)


class CatalogSoftmax(keras.layers.Layer):
    """Every catalog item as a negative: the exact softmax over the catalog, no sampling.

    A sampled softmax estimates it; with a catalog of a few thousand items the whole of it
    costs one candidate-tower pass and one ``[N, C]`` product per step, and sequential
    retrievers trained on it rank far better than on sampled negatives (Klenitskiy and
    Vasilev, "Turning Dross Into Gold Loss", RecSys 2023). No logQ correction: nothing is
    sampled. The catalog's candidate features are constants of the training model only.

    Args:
        catalog: candidate feature name -> one value per catalog item (``item_id`` among them).
    """

    def __init__(self, catalog: Mapping[str, Sequence[str]]) -> None:
        super().__init__(name="catalog_softmax")
        self.catalog = {name: tf.constant(list(values), dtype=tf.string) for name, values in catalog.items()}
        ids = self.catalog["item_id"]
        self.position = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(ids, tf.range(tf.size(ids), dtype=tf.int64)), default_value=-1
        )

    def per_example(
        self,
        query: tf.Tensor,
        candidate_model: keras.Model,
        item_ids: tf.Tensor,
        temperature: float | None,
        training: bool,
    ) -> tf.Tensor:
        """Cross-entropy of each query's item against the whole catalog; items outside it are left out."""
        logits = tf.matmul(query, candidate_model(self.catalog, training=training), transpose_b=True)
        if temperature:
            logits = logits / temperature
        labels = self.position.lookup(item_ids)
        known = labels >= 0
        return tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.boolean_mask(labels, known), logits=tf.boolean_mask(logits, known)
        )


def retrieval_loss(
    task: tfrs.tasks.Retrieval,
    query: tf.Tensor,
    candidate_model: keras.Model,
    positives: Mapping[str, tf.Tensor],
    probability: tf.Tensor,
    uniform: UniformNegatives | CatalogSoftmax | None,
    logq_correction: bool,
    training: bool,
    temperature: float | None = None,
) -> tf.Tensor:
    """Sampled softmax of ``[N, D]`` queries over their ``N`` positives (+ uniform negatives),
    or, with ``CatalogSoftmax``, the exact softmax over the whole catalog.

    With uniform negatives the candidate set is a mixture, and the logQ correction uses each
    candidate's expected count in it: ``N * p(item) + U / catalog size`` (in-batch draws follow
    popularity, uniform draws do not). Only differences between a row's logits matter, so
    the correction needs no normalization.
    """
    if isinstance(uniform, CatalogSoftmax):
        ids = positives["item_id"]
        return replica_loss(uniform.per_example(query, candidate_model, ids, temperature, training))
    candidate_features = dict(positives)
    ids = positives["item_id"]
    if uniform is not None:
        sampled, sampled_probability = uniform.sample()
        candidate_features = {n: tf.concat([v, sampled[n]], axis=0) for n, v in positives.items()}
        ids = candidate_features["item_id"]
        batch = tf.cast(tf.shape(query)[0], tf.float32)
        probability = (
            batch * tf.concat([probability, sampled_probability], axis=0) + uniform.count / uniform.size
        )
    candidate = candidate_model(candidate_features, training=training)
    per_example = task(
        query,
        candidate,
        candidate_sampling_probability=probability if logq_correction else None,
        candidate_ids=ids,
        compute_metrics=False,
        compute_batch_metrics=False,
    )
    return replica_loss(per_example)


class SequentialRetriever(ReplicaLogs, tfrs.Model):
    """The two-tower retriever with a sequential query tower, trained on whole user sequences.

    An example is a window of one user's positives in time order. ``SequentialQueryTower``
    gives a query at every position (having read the items before it); the position's target
    is the item that came next. All positions of the batch with ``target_weight > 0`` are
    gathered into one flat batch of (query, next item) pairs, and the loss is the same
    sampled softmax as ``TwoTowerRetriever``'s: every other target of the batch (other
    positions, other users) is a negative, with logQ correction and accidental hits removed;
    optionally uniform catalog negatives too. Padding and, for validation, positions whose
    target is not held out carry weight 0 and never enter the softmax.
    """

    def __init__(
        self,
        query_model: SequentialQueryTower,
        candidate_model: keras.Model,
        temperature: float | None,
        logq_correction: bool,
        uniform_negatives: UniformNegatives | CatalogSoftmax | None = None,
    ) -> None:
        super().__init__()
        self.query_model = query_model
        self.candidate_model = candidate_model
        self.logq_correction = logq_correction
        self.uniform_negatives = uniform_negatives
        self.temperature = temperature
        self.task = tfrs.tasks.Retrieval(
            loss=keras.losses.CategoricalCrossentropy(
                from_logits=True, reduction=keras.losses.Reduction.NONE
            ),
            temperature=temperature,
            remove_accidental_hits=True,
        )

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        queries = self.query_model.encode_positions(features, training=training)  # [B, T, D]
        scored = features["target_weight"] > 0  # [B, T]
        return retrieval_loss(
            self.task,
            tf.boolean_mask(queries, scored),
            self.candidate_model,
            {name: tf.boolean_mask(features[name], scored) for name in CANDIDATE_FEATURES},
            tf.boolean_mask(features["sampling_probability"], scored),
            self.uniform_negatives,
            self.logq_correction,
            training,
            self.temperature,
        )


class MultiObjectiveRanker(ReplicaLogs, tfrs.Model):
    """Scores (user, item, context) candidates for several objectives and combines them.

    Heads: ``click`` (probability that a shown item is clicked) and ``engagement`` (expected
    engagement in [0, 1]: dwell, rating, purchase, zero when not clicked). Each is a
    ``tfrs.tasks.Ranking`` task; the losses add up. The served ``score`` is the weighted sum
    with ``objective_weights``, a business decision that can change without retraining the
    heads' meaning.

    The network sees the user side (id, profile, recent items, context, engagement counts),
    the item side (id, categories, popularity counts) and their element-wise product (the
    pair's affinity), then a shared MLP feeds one sigmoid head per objective.
    """

    def __init__(
        self,
        *,
        users: Sequence[str],
        items: Sequence[str],
        categories: Sequence[str],
        profile_vocab: Mapping[str, Sequence[str]],
        numeric_features: Sequence[str],
        numeric_normalizer: keras.layers.Normalization | None,
        objective_weights: Mapping[str, float],
        id_dim: int,
        feature_dim: int,
        hidden_units: Sequence[int],
        num_oov: int,
        id_dropout: float,
        max_history: int,
        item_categories: Mapping[str, str] | None = None,  # item id -> primary category
        position_buckets: int = 0,
        serving_position: int = 0,
    ) -> None:
        super().__init__(name="ranker")
        self.num_oov, self.id_dropout, self.max_history = num_oov, id_dropout, max_history
        # As in the query tower: the categories of the recent items, a taste profile that the
        # candidate's own categories are matched against (same embedding table).
        self.history_categories = primary_category_table(item_categories) if item_categories else None
        self.objective_weights = dict(objective_weights)
        self.numeric_features = list(numeric_features)
        self.user_numeric = [n for n in self.numeric_features if n.startswith("user_")]
        if self.numeric_features[: len(self.user_numeric)] != self.user_numeric:
            # The normalizer's columns are split by position between the user and item sides.
            raise ValueError(f"numeric_features must list user_* features first, got {self.numeric_features}")
        self.user_lookup = id_lookup(users, num_oov, "user_lookup")
        self.user_embedding = keras.layers.Embedding(len(users) + num_oov + 1, id_dim)
        self.item_lookup = id_lookup(items, num_oov, "item_lookup")
        self.item_embedding = keras.layers.Embedding(len(items) + num_oov + 1, id_dim)
        self.history_embedding = keras.layers.Embedding(len(items) + num_oov + 1, id_dim)
        self.category_lookup = keras.layers.StringLookup(
            vocabulary=list(categories), mask_token="", num_oov_indices=1
        )
        self.category_embedding = keras.layers.Embedding(len(categories) + 2, id_dim)
        self.profile = {
            name: CategoricalEmbedding(vocab, feature_dim, name=f"{name}_embedding")
            for name, vocab in profile_vocab.items()
        }
        self.hour_embedding = keras.layers.Embedding(24, feature_dim)
        self.normalizer = numeric_normalizer
        self.user_projection = keras.layers.Dense(id_dim)
        self.item_projection = keras.layers.Dense(id_dim)
        self.body = mlp(hidden_units, None, "ranker_mlp")
        self.heads = {k: keras.layers.Dense(1, name=f"{k}_head") for k in self.objective_weights}
        self.position_buckets = position_buckets
        self.serving_bucket = min(serving_position, max(position_buckets - 1, 0)) + 1
        # [bucket, objective] logit offsets; row 0 (rank not logged) is never read.
        self.position_bias = (
            self.add_weight(
                name="position_bias",
                shape=(position_buckets + 1, len(self.objective_weights)),
                initializer="zeros",
            )
            if position_buckets
            else None
        )
        self.tasks = {
            # Per example ([B, 1] in, [B] out); compute_loss takes the mean (``replica_loss``).
            "click": tfrs.tasks.Ranking(
                loss=keras.losses.BinaryCrossentropy(reduction=keras.losses.Reduction.NONE),
                metrics=[keras.metrics.AUC(name="click_auc")],
            ),
            "engagement": tfrs.tasks.Ranking(
                loss=keras.losses.MeanSquaredError(reduction=keras.losses.Reduction.NONE),
                metrics=[keras.metrics.RootMeanSquaredError(name="engagement_rmse")],
            ),
        }

    @staticmethod
    def is_item_input(name: str) -> bool:
        """Whether an input describes the candidate (the rest describe the user and context)."""
        return name in ITEM_SIDE_INPUTS or name.startswith("item_")

    def _numeric(self, features: Mapping[str, tf.Tensor], names: Sequence[str], offset: int) -> tf.Tensor:
        """log1p counts, standardized with the training statistics of columns offset..offset+len."""
        raw = tf.stack([tf.cast(features[n], tf.float32) for n in names], axis=1)
        numeric = tf.math.log1p(tf.maximum(raw, 0.0))
        if self.normalizer is None:
            return numeric
        # The adapted Normalization layer's own formula, on this side's slice of its statistics,
        # so that the user side and the item side can be computed apart (see score_candidates).
        mean = tf.reshape(self.normalizer.mean, [-1])[offset : offset + len(names)]
        variance = tf.reshape(self.normalizer.variance, [-1])[offset : offset + len(names)]
        return (numeric - mean) / tf.maximum(tf.sqrt(variance), keras.backend.epsilon())

    def encode_user(
        self, features: Mapping[str, tf.Tensor], training: bool | None = None
    ) -> tuple[tf.Tensor, tf.Tensor | None]:
        """``[B, du]`` user-and-context vector, and ``[B, dc]`` recent category taste (or None)."""
        user = drop_ids(self.user_lookup(features["user_id"]), self.id_dropout, self.num_oov, training)
        tokens = split_tokens(features["recent_items"], self.max_history)
        hour = tf.clip_by_value(tf.cast(features["hour"], tf.int32), 0, 23)
        parts = [
            self.user_embedding(user),
            bag_mean(self.item_lookup(tokens), self.history_embedding),
            self.hour_embedding(hour),
            *(layer(features[name]) for name, layer in self.profile.items()),
        ]
        taste = None
        if self.history_categories is not None:
            taste = bag_mean(
                self.category_lookup(self.history_categories.lookup(tokens)), self.category_embedding
            )
            parts.append(taste)
        if self.user_numeric:
            parts.append(self._numeric(features, self.user_numeric, 0))
        return tf.concat(parts, axis=1), taste

    def encode_items(
        self, features: Mapping[str, tf.Tensor], training: bool | None = None
    ) -> tuple[tf.Tensor, tf.Tensor]:
        """``[N, di]`` candidate vector, and ``[N, dc]`` the candidate's category embedding."""
        item = drop_ids(self.item_lookup(features["item_id"]), self.id_dropout, self.num_oov, training)
        cats = self.category_lookup(split_tokens(features["category"], MAX_CATEGORIES, CATEGORY_SEPARATOR))
        item_category = bag_mean(cats, self.category_embedding)
        parts = [self.item_embedding(item), item_category]
        item_numeric = self.numeric_features[len(self.user_numeric) :]
        if item_numeric:
            parts.append(self._numeric(features, item_numeric, len(self.user_numeric)))
        return tf.concat(parts, axis=1), item_category

    def _position_offsets(self, features: Mapping[str, tf.Tensor]) -> tf.Tensor | None:
        """``[B or 1, objectives]`` logit offsets of the examples' ranks; at serving (no
        ``position`` input) the fixed ``serving_position``'s, the same for every candidate."""
        if self.position_bias is None:
            return None
        table = self.position_bias
        if "position" not in features:
            return tf.gather(table, [self.serving_bucket])
        rank = tf.cast(features["position"], tf.int32)
        logged = tf.cast(rank >= 0, tf.float32)[:, None]
        bucket = tf.minimum(tf.maximum(rank, 0), self.position_buckets - 1) + 1
        return tf.gather(table, bucket) * logged

    def _heads(self, hidden: tf.Tensor, offsets: tf.Tensor | None) -> dict[str, tf.Tensor]:
        out = {}
        for n, (k, head) in enumerate(self.heads.items()):
            logit = tf.squeeze(head(hidden), axis=1)
            if offsets is not None:
                logit += offsets[:, n]
            out[k] = tf.sigmoid(logit)
        out["score"] = tf.add_n([w * out[k] for k, w in self.objective_weights.items()])
        return out

    def call(self, features: Mapping[str, tf.Tensor], training: bool | None = None) -> dict[str, tf.Tensor]:
        user_side, taste = self.encode_user(features, training)
        item_side, item_category = self.encode_items(features, training)
        affinity = self.user_projection(user_side) * self.item_projection(item_side)
        # How well the candidate's categories fit the user's recent taste, as one number.
        matches = [] if taste is None else [tf.reduce_sum(taste * item_category, axis=1, keepdims=True)]
        hidden = self.body(tf.concat([user_side, item_side, affinity, *matches], axis=1), training=training)
        return self._heads(hidden, self._position_offsets(features))

    def score_candidates(
        self, user_features: Mapping[str, tf.Tensor], item_features: Mapping[str, tf.Tensor]
    ) -> dict[str, tf.Tensor]:
        """One user (``[1]`` inputs) against ``N`` candidates: the same scores as ``call`` on N pairs.

        The user side and its share of the first layer are computed once, not once per
        candidate: the first layer's matmul over ``concat(user, item, affinity, match)`` is the
        sum of per-part matmuls, so the user's part becomes one row broadcast over N.

        The affinity part folds into the item part's kernel. With ``u = user_projection(user)``
        and the linear ``item_projection(x) = x W + b``, ``(u * (x W + b)) K_a = x ((W * u) K_a)
        + (u * b) K_a``: one ``[di, h]`` matrix per request instead of two matmuls over the N
        candidates (``item_projection`` and the affinity's kernel), and the same numbers up to
        float rounding.
        """
        user_side, taste = self.encode_user(user_features)
        item_side, item_category = self.encode_items(item_features)
        user_projected = self.user_projection(user_side)  # [1, a]
        first, *rest = self.body.layers
        du, di, da = user_side.shape[-1], item_side.shape[-1], user_projected.shape[-1]
        kernel = first.kernel
        affinity_kernel = kernel[du + di : du + di + da]  # [a, h]
        projection = self.item_projection
        item_kernel = kernel[du : du + di] + tf.matmul(projection.kernel * user_projected, affinity_kernel)
        user_row = (
            tf.matmul(user_side, kernel[:du])
            + tf.matmul(user_projected * projection.bias, affinity_kernel)
            + first.bias
        )
        pre = tf.matmul(item_side, item_kernel) + user_row
        if taste is not None:
            match = tf.reduce_sum(taste * item_category, axis=1, keepdims=True)
            pre += match * kernel[-1:]
        hidden = first.activation(pre)
        for layer in rest:
            hidden = layer(hidden)
        return self._heads(hidden, self._position_offsets({}))

    def compute_loss(self, features: Mapping[str, tf.Tensor], training: bool = False) -> tf.Tensor:
        out = self(features, training=training)
        per_example = tf.add_n(
            [
                self.tasks[k](labels=features[f"label_{k}"][:, None], predictions=out[k][:, None])
                for k in self.objective_weights
            ]
        )
        return replica_loss(per_example)
