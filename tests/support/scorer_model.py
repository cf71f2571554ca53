"""A small test SavedModel in TF Serving's layout, whose answers show which version served.

The ``Scorer`` has two signatures:
- ``serving_default(text: string[N], x: float[N]) -> {score: len(text) + x + bias, echo: text + "!"}``
- ``other(x: float[N]) -> {doubled: 2x + bias}``
and ``bias`` is the version number it was built with.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def import_tensorflow() -> Any:
    """TensorFlow, on Keras 2 (TFRS needs tf_keras), imported on first use (it takes seconds)."""
    os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
    import tensorflow as tf

    return tf


def build_scorer(path: Path, bias: float, warmup_records: int = 0) -> None:
    """Save a ``Scorer`` SavedModel at ``path`` (a version folder), optionally with warm-up records."""
    tf = import_tensorflow()
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    class Scorer(tf.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bias = tf.Variable(float(bias))

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string), tf.TensorSpec([None], tf.float32)])
        def serve(self, text: Any, x: Any) -> dict[str, Any]:
            length = tf.cast(tf.strings.length(text, unit="UTF8_CHAR"), tf.float32)
            return {"score": length + x + self.bias, "echo": tf.strings.join([text, "!"])}

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def other(self, x: Any) -> dict[str, Any]:
            return {"doubled": 2.0 * x + self.bias}

    module = Scorer()
    # Written to a temporary name and renamed into place, as a publisher does, so the
    # server never sees half a version.
    tmp = path.with_name(f".tmp-{path.name}")
    tf.saved_model.save(module, str(tmp), signatures={"serving_default": module.serve, "other": module.other})
    if warmup_records:
        (tmp / "assets.extra").mkdir()
        with tf.io.TFRecordWriter(str(tmp / "assets.extra" / "tf_serving_warmup_requests")) as w:
            for _ in range(warmup_records):
                request = predict_pb2.PredictRequest()
                request.inputs["text"].CopyFrom(tf.make_tensor_proto([b"warm"]))
                request.inputs["x"].CopyFrom(tf.make_tensor_proto([1.0], dtype=tf.float32))
                log = prediction_log_pb2.PredictionLog(
                    predict_log=prediction_log_pb2.PredictLog(request=request)
                )
                w.write(log.SerializeToString())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(path)
