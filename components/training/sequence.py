"""A causal self-attention encoder over a user's items in time order (SASRec-style).

Where a bag of recent items says "more of what you touched", an ordered sequence can say
"what comes *next* after these": the last items weigh more, and the order of genres or
series matters. The encoder reads ``[B, T, d]`` item vectors, oldest first, and returns one
state per position that has seen only that position and the ones before it (a causal mask).
Trained on a whole sequence at once, every prefix is a training query in one pass: the state
at position ``t`` predicts the item at ``t + 1``.

Sequences are right-padded: position 0 holds the first item of the window (or a start
token), so a real position never attends to padding (all padding lies after it) and the
causal mask alone suffices. Positions are learned embeddings of the index in the window,
as in SASRec (Kang & McAuley, 2018).

Time enters the attention, as in TiSASRec (Li et al., 2020): an optional ``[B, T, T]`` matrix
of age buckets (how long before position ``j``'s target event item ``i`` happened) adds a
learned per-head bias to each logit. The whole window is still encoded once: each query
row carries its own ages, so every prefix is aged from its own event in the same pass.

Import after ``TF_USE_LEGACY_KERAS=1`` is set, like ``components.training.models``.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


class AgeBiasedSelfAttention(keras.layers.Layer):
    """Causal multi-head self-attention whose logits carry a learned bias per head and age bucket.

    ``ages`` ``[B, T, T]`` holds, for query position ``j`` and key position ``i``, the bucket of
    how long before ``j``'s target event ``i`` happened (``0``: not known, or ``i > j``). Each
    head adds ``table[bucket]`` to the logit of (``j``, ``i``), TiSASRec-style: whether an
    item was minutes or months before the event weighs how much it is attended to. Bucket 0
    adds nothing (a fixed zero row), so a window without times attends as plain SASRec; the
    learned rows start at zero too.

    Args:
        dim: width of the inputs and of the output.
        heads: attention heads (each of width ``dim // heads``).
        dropout: on the attention weights.
        age_buckets: how many known age buckets (ids ``1..age_buckets``); 0: no bias at all.
    """

    def __init__(self, dim: int, heads: int, dropout: float, age_buckets: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.heads, self.key_dim = heads, max(dim // heads, 1)
        width = heads * self.key_dim
        self.query = keras.layers.Dense(width, name="query")
        self.key = keras.layers.Dense(width, name="key")
        self.value = keras.layers.Dense(width, name="value")
        self.output_projection = keras.layers.Dense(dim, name="output")
        self.attention_dropout = keras.layers.Dropout(dropout)
        self.age_table = (
            self.add_weight(name="age_bias", shape=(age_buckets, heads), initializer="zeros")
            if age_buckets > 0
            else None
        )

    def _split(self, x: tf.Tensor) -> tf.Tensor:
        """``[B, T, H * k]`` -> ``[B, H, T, k]``."""
        shape = tf.shape(x)
        return tf.transpose(tf.reshape(x, [shape[0], shape[1], self.heads, self.key_dim]), [0, 2, 1, 3])

    def age_bias(self, ages: tf.Tensor) -> tf.Tensor:
        """``[B, T, T]`` age buckets -> ``[B, H, T, T]`` logit biases (0 where the age is not known)."""
        if self.age_table is None:
            raise ValueError("no age buckets: this attention has no age bias")
        table = tf.concat([tf.zeros([1, self.heads], self.age_table.dtype), self.age_table], axis=0)
        return tf.transpose(tf.gather(table, tf.cast(ages, tf.int32)), [0, 3, 1, 2])

    def call(self, x: tf.Tensor, ages: tf.Tensor | None = None, training: bool | None = None) -> tf.Tensor:
        q, k, v = self._split(self.query(x)), self._split(self.key(x)), self._split(self.value(x))
        logits = tf.matmul(q, k, transpose_b=True) / tf.sqrt(tf.cast(self.key_dim, x.dtype))  # [B, H, T, T]
        if ages is not None and self.age_table is not None:
            logits += self.age_bias(ages)
        steps = tf.shape(x)[1]
        causal = tf.linalg.band_part(tf.ones([steps, steps], tf.bool), -1, 0)  # key i <= query j
        logits = tf.where(causal, logits, tf.fill(tf.shape(logits), tf.constant(-1e9, logits.dtype)))
        weights = self.attention_dropout(tf.nn.softmax(logits, axis=-1), training=training)
        attended = tf.transpose(tf.matmul(weights, v), [0, 2, 1, 3])  # [B, T, H, k]
        shape = tf.shape(x)
        return self.output_projection(tf.reshape(attended, [shape[0], shape[1], self.heads * self.key_dim]))


class CausalSelfAttentionBlock(keras.layers.Layer):
    """One pre-norm transformer block: causal self-attention (age-biased), then a position-wise MLP.

    Pre-norm (layer norm before each sub-layer, residual around it) trains stably with a few
    blocks and no learning-rate warm-up, which matters when the epoch budget is small.
    """

    def __init__(self, dim: int, heads: int, dropout: float, age_buckets: int = 0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention = AgeBiasedSelfAttention(dim, heads, dropout, age_buckets, name="attention")
        self.feed_forward_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.feed_forward = keras.Sequential(
            [
                keras.layers.Dense(dim, activation="relu"),
                keras.layers.Dropout(dropout),
                keras.layers.Dense(dim),
            ]
        )
        self.dropout = keras.layers.Dropout(dropout)

    def call(self, x: tf.Tensor, ages: tf.Tensor | None = None, training: bool | None = None) -> tf.Tensor:
        normed = self.attention_norm(x)
        attended = self.attention(normed, ages, training=training)
        x = x + self.dropout(attended, training=training)
        return x + self.dropout(
            self.feed_forward(self.feed_forward_norm(x), training=training), training=training
        )


class CausalSequenceEncoder(keras.layers.Layer):
    """``[B, T, d]`` item vectors (oldest first, right-padded) -> ``[B, T, d]`` causal states.

    ``ages`` (optional, ``[B, T, T]`` int bucket ids, 0 unknown) biases every block's attention
    (``AgeBiasedSelfAttention``); without it the encoder is plain SASRec.

    Args:
        max_length: T, the longest window (positions beyond it have no embedding).
        dim: d, the width of the item vectors and of every state.
        layers: how many attention blocks are stacked.
        heads: attention heads per block (each of width ``dim // heads``).
        dropout: on the inputs, the attention weights and each sub-layer's output.
        age_buckets: how many known age buckets the attention biases have (0: none).
    """

    def __init__(
        self,
        max_length: int,
        dim: int,
        layers: int,
        heads: int,
        dropout: float,
        age_buckets: int = 0,
        **kwargs: object,
    ) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length
        self.position_embedding = keras.layers.Embedding(max_length, dim, name="position_embedding")
        self.input_dropout = keras.layers.Dropout(dropout)
        self.blocks = [
            CausalSelfAttentionBlock(dim, heads, dropout, age_buckets, name=f"block_{i}")
            for i in range(layers)
        ]
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, x: tf.Tensor, ages: tf.Tensor | None = None, training: bool | None = None) -> tf.Tensor:
        positions = tf.range(tf.shape(x)[1])
        x = x + self.position_embedding(positions)[tf.newaxis]
        x = self.input_dropout(x, training=training)
        for block in self.blocks:
            x = block(x, ages, training=training)
        return self.output_norm(x)
