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

Import after ``TF_USE_LEGACY_KERAS=1`` is set, like ``components.training.models``.
"""

from __future__ import annotations

import tensorflow as tf
import tf_keras as keras


class CausalSelfAttentionBlock(keras.layers.Layer):
    """One pre-norm transformer block: causal multi-head self-attention, then a position-wise MLP.

    Pre-norm (layer norm before each sub-layer, residual around it) trains stably with a few
    blocks and no learning-rate warm-up, which matters when the epoch budget is small.
    """

    def __init__(self, dim: int, heads: int, dropout: float, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.attention_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=heads, key_dim=max(dim // heads, 1), dropout=dropout
        )
        self.feed_forward_norm = keras.layers.LayerNormalization(epsilon=1e-6)
        self.feed_forward = keras.Sequential(
            [
                keras.layers.Dense(dim, activation="relu"),
                keras.layers.Dropout(dropout),
                keras.layers.Dense(dim),
            ]
        )
        self.dropout = keras.layers.Dropout(dropout)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        normed = self.attention_norm(x)
        attended = self.attention(normed, normed, use_causal_mask=True, training=training)
        x = x + self.dropout(attended, training=training)
        return x + self.dropout(
            self.feed_forward(self.feed_forward_norm(x), training=training), training=training
        )


class CausalSequenceEncoder(keras.layers.Layer):
    """``[B, T, d]`` item vectors (oldest first, right-padded) -> ``[B, T, d]`` causal states.

    Args:
        max_length: T, the longest window (positions beyond it have no embedding).
        dim: d, the width of the item vectors and of every state.
        layers: how many attention blocks are stacked.
        heads: attention heads per block (each of width ``dim // heads``).
        dropout: on the inputs, the attention weights and each sub-layer's output.
    """

    def __init__(
        self, max_length: int, dim: int, layers: int, heads: int, dropout: float, **kwargs: object
    ) -> None:
        super().__init__(**kwargs)
        self.max_length = max_length
        self.position_embedding = keras.layers.Embedding(max_length, dim, name="position_embedding")
        self.input_dropout = keras.layers.Dropout(dropout)
        self.blocks = [
            CausalSelfAttentionBlock(dim, heads, dropout, name=f"block_{i}") for i in range(layers)
        ]
        self.output_norm = keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, x: tf.Tensor, training: bool | None = None) -> tf.Tensor:
        positions = tf.range(tf.shape(x)[1])
        x = x + self.position_embedding(positions)[tf.newaxis]
        x = self.input_dropout(x, training=training)
        for block in self.blocks:
            x = block(x, training=training)
        return self.output_norm(x)
