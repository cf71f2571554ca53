"""One loaded model version (a *servable*): a SavedModel's signatures, ready to run.

A SavedModel holds one or more *signatures*: named functions with typed, named inputs
and outputs (``serving_default`` unless a request names another). TF Serving loads the
meta graph tagged ``serve`` and runs a signature by feeding its input tensors and fetching
its outputs. This stand-in loads the same directory with ``tf.saved_model.load`` and calls
the signature's concrete function, and it reads the ``SignatureDef`` protos straight from
``saved_model.pb``, so metadata answers carry exactly the tensor names, dtypes and shapes
that TF Serving would report.

Warm-up: a version may ship ``assets.extra/tf_serving_warmup_requests``, a TFRecord file of
``PredictionLog`` records. They are replayed once at load, before the version is marked
AVAILABLE, so the first real request does not pay for tracing and memory allocation;
a failing record fails the load, and more than 1000 records is an error, as in TF Serving.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from serving.model_server.errors import ServingError, failed_precondition, from_exception, invalid_argument
from serving.model_server.tensors import DT_STRING, dtype_enum, dtype_name, ndarray_from_proto

DEFAULT_SIGNATURE = "serving_default"
SERVE_TAG = "serve"
WARMUP_FILE = Path("assets.extra") / "tf_serving_warmup_requests"
MAX_WARMUP_RECORDS = 1000


def read_signature_defs(version_dir: Path, tags: Sequence[str] = (SERVE_TAG,)) -> dict[str, Any]:
    """The ``SignatureDef`` protos of the meta graph tagged ``tags`` in ``saved_model.pb``.

    Raises:
        ServingError: DATA_LOSS when the file is not a SavedModel proto (a truncated or
            corrupt push), NOT_FOUND when no meta graph has the tags.
    """
    from google.protobuf.message import DecodeError
    from tensorflow.core.protobuf import saved_model_pb2

    saved_model = saved_model_pb2.SavedModel()
    pb = version_dir / "saved_model.pb"
    if pb.is_file():
        try:
            saved_model.ParseFromString(pb.read_bytes())
        except DecodeError:
            raise ServingError("DATA_LOSS", f"Can't parse {pb} as binary proto") from None
    else:
        from google.protobuf import text_format

        txt = version_dir / "saved_model.pbtxt"
        try:
            text_format.Parse(txt.read_text(), saved_model)
        except (OSError, text_format.ParseError) as e:
            raise ServingError("DATA_LOSS", f"Can't parse {txt} as text proto: {e}") from None
    wanted = set(tags)
    for meta_graph in saved_model.meta_graphs:
        if set(meta_graph.meta_info_def.tags) == wanted:
            return dict(meta_graph.signature_def)
    raise ServingError(
        "NOT_FOUND",
        "Could not find meta graph def matching supplied tags: { "
        + " ".join(sorted(wanted))
        + " }. To inspect available tag-sets in the SavedModel, please use the SavedModel CLI: "
        "`saved_model_cli`",
    )


def _flat_call(fn: Any, signature_def: Any) -> tuple[list[str], Any] | None:
    """The input aliases in the order a signature's graph takes them flat, and the function that
    runs the graph on ``flat inputs + captured inputs``; None to use the keyword call.

    Calling a loaded signature with keywords goes through TensorFlow's structured binding
    (``bind_with_defaults``, ``TensorSpec.cast``), and its ``_call_flat`` still maps
    captures for distribution strategies and checks for gradient tapes before it ends in
    ``_inference_function.call_preflattened`` (the cost of each layer: BENCHMARKS.md,
    "Measured costs behind design choices"). The inputs are already checked here against
    the SignatureDef (names, dtypes, shapes) and the model server runs no strategy and records
    no gradients, so it calls that last step itself with the flat tensor list, in the order of
    the keyword arguments. ``_arg_keywords`` and ``_inference_function`` are not public
    TensorFlow API: TF is pinned, and a test compares both calls. None when that order cannot
    be read or does not match the SignatureDef's inputs, or the function is not there.
    """
    order = getattr(fn, "_arg_keywords", None)
    call = getattr(getattr(fn, "_inference_function", None), "call_preflattened", None)
    if signature_def is None or not order or call is None:
        return None
    if sorted(order) != sorted(signature_def.inputs):
        return None
    if len(fn.inputs) - len(fn.captured_inputs) != len(order):
        return None
    return list(order), call


@dataclass(frozen=True)
class _SignatureSpec:
    """What ``run`` checks a request against, read from the SignatureDef at load, not per call."""

    expected: list[str]  # input aliases, sorted (TF Serving's messages list them so)
    # alias: (arg index, DataType, tf dtype, dims, (axis, size) of each known dim)
    inputs: dict[str, tuple[int, int, Any, list[int] | None, tuple[tuple[int, int], ...]]]
    outputs: list[str]  # output aliases, sorted


def _tensor_maker() -> Callable[[np.ndarray, Any], Any]:
    """A function ``(array, tf dtype) -> eager tensor`` for one request's inputs (dtypes checked).

    ``EagerTensor(value, device, dtype)`` is what ``tf.constant`` ends in, without its Python
    layers of dispatch and conversion checks, which cost a noticeable share of a ranking call
    with its 26 inputs (BENCHMARKS.md, "Measured costs behind design choices"). The context
    and its device are looked up once per request, not once per input. Not public TensorFlow
    API (TF is pinned); ``tf.constant`` otherwise.
    """
    import tensorflow as tf

    try:
        from tensorflow.python.eager import context
        from tensorflow.python.framework.ops import EagerTensor

        ctx = context.context()
        ctx.ensure_initialized()  # as tf.constant does: before it, the device name is not set
        device = ctx.device_name
    except (ImportError, AttributeError):
        return lambda array, tf_dtype: tf.constant(array, dtype=tf_dtype)

    def make(array: np.ndarray, tf_dtype: Any) -> Any:
        try:
            return EagerTensor(array, device, tf_dtype.as_datatype_enum)
        except TypeError:
            return tf.constant(array, dtype=tf_dtype)

    return make


def _shape_dims(tensor_info: Any) -> list[int] | None:
    shape = tensor_info.tensor_shape
    return None if shape.unknown_rank else [d.size for d in shape.dim]


def _signature_spec(sig: Any) -> _SignatureSpec:
    import tensorflow as tf

    expected = sorted(sig.inputs)
    return _SignatureSpec(
        expected=expected,
        inputs={
            alias: (
                i,
                info.dtype,
                tf.as_dtype(info.dtype),
                dims,
                tuple((a, d) for a, d in enumerate(dims or []) if d >= 0),
            )
            for i, alias in enumerate(expected)
            for info in (sig.inputs[alias],)
            for dims in (_shape_dims(info),)
        },
        outputs=sorted(sig.outputs),
    )


class Servable:
    """A model version that serves: signatures to run and their definitions to describe.

    Args:
        name: the model name (from ``models.config``).
        version: the integer version (the folder name).
        path: the version folder.
        signature_defs: ``{signature name: SignatureDef}`` read from ``saved_model.pb``.
        loaded: the object ``tf.saved_model.load`` returned (kept alive while serving).
    """

    def __init__(self, name: str, version: int, path: Path, signature_defs: dict[str, Any], loaded: Any):
        self.name = name
        self.version = version
        self.path = path
        self.signature_defs = signature_defs
        self._loaded = loaded
        self._functions: dict[str, Any] = dict(getattr(loaded, "signatures", {}))
        self._flat_calls = {
            key: flat
            for key, fn in self._functions.items()
            if (flat := _flat_call(fn, signature_defs.get(key))) is not None
        }
        self._specs = {key: _signature_spec(sig) for key, sig in signature_defs.items()}

    @classmethod
    def load(cls, name: str, version: int, path: Path, tags: Sequence[str] = (SERVE_TAG,)) -> Servable:
        """Load a version folder; raise ``ServingError`` with TF's code when it cannot be served."""
        os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
        signature_defs = read_signature_defs(path, tags)
        import tensorflow as tf

        try:
            loaded = tf.saved_model.load(str(path), tags=list(tags))
        except Exception as e:  # noqa: BLE001 - every load failure becomes the version's status
            raise from_exception(e) from None
        return cls(name, version, path, signature_defs, loaded)

    def input_dtypes(self, signature_name: str) -> dict[str, int]:
        """``{input alias: DataType}`` of a signature (what REST JSON is converted to)."""
        sig = self.signature_defs[signature_name]
        return {alias: info.dtype for alias, info in sig.inputs.items()}

    def run(
        self,
        signature_name: str,
        inputs: Mapping[str, np.ndarray],
        output_filter: Sequence[str] = (),
    ) -> tuple[str, dict[str, np.ndarray]]:
        """Run one signature on input arrays; the checks and messages follow ``predict_util.cc``.

        Args:
            signature_name: the signature key; empty means ``serving_default``.
            inputs: ``{alias: array}``; strings as object arrays of bytes.
            output_filter: output aliases to return (all when empty).

        Returns:
            ``(signature name used, {output alias: array})``.

        Raises:
            ServingError: FAILED_PRECONDITION for an unknown signature, INVALID_ARGUMENT for
                inputs that do not fit it, and the runtime's own code for failures while running.
        """
        signature_name = signature_name or DEFAULT_SIGNATURE
        sig = self.signature_defs.get(signature_name)
        fn = self._functions.get(signature_name)
        if sig is None or fn is None:
            raise failed_precondition(f'Serving signature key "{signature_name}" not found.')
        spec = self._specs[signature_name]
        expected = spec.expected
        if len(inputs) != len(expected) or any(alias not in spec.inputs for alias in inputs):
            sent = sorted(inputs)
            if len(sent) > len(expected) or (len(sent) < len(expected) and not sig.defaults):
                extra = sorted(set(sent) - set(expected))
                missing = sorted(set(expected) - set(sent))
                raise invalid_argument(
                    f"input size does not match signature: {len(sent)}!={len(expected)} "
                    f"len({{{','.join(sent)}}}) != len({{{','.join(expected)}}}). "
                    f"Sent extra: {{{','.join(extra)}}}. Missing but required: {{{','.join(missing)}}}."
                )
            for alias in sent:
                if alias not in sig.inputs:
                    raise invalid_argument(
                        f"input tensor alias not found in signature: {alias}. "
                        f"Inputs expected to be in the set {{{','.join(expected)}}}."
                    )
        seen: set[str] = set()
        for alias in output_filter:
            if alias not in sig.outputs:
                raise invalid_argument(
                    f"output tensor alias not found in signature: {alias} "
                    f"Outputs expected to be in the set {{{','.join(sorted(sig.outputs))}}}."
                )
            if alias in seen:
                raise invalid_argument(f"duplicate output tensor alias: {alias}")
            seen.add(alias)

        import tensorflow as tf

        feeds: dict[str, Any] = {}
        tensor = _tensor_maker()
        for alias in expected:
            array = inputs.get(alias)
            if array is None:
                continue  # an input with a default in the signature
            i, dtype, tf_dtype, dims, fixed = spec.inputs[alias]
            got = dtype_enum(array)
            if got != dtype:
                # The session's own wording when a fed tensor has the wrong dtype.
                raise invalid_argument(
                    f"Expects arg[{i}] to be {dtype_name(dtype)} but {dtype_name(got)} is provided"
                )
            if dims is not None and (
                array.ndim != len(dims) or any(array.shape[a] != d for a, d in fixed)
            ):
                raise invalid_argument(
                    f"The shape of input {alias} is [{','.join(str(s) for s in array.shape)}] but the "
                    f"signature expects [{','.join('?' if d < 0 else str(d) for d in dims)}]"
                )
            feeds[alias] = tensor(array, tf_dtype)
        flat_call = self._flat_calls.get(signature_name)
        try:
            if flat_call is not None and len(feeds) == len(flat_call[0]):
                order, call = flat_call
                result = call([feeds[alias] for alias in order] + list(fn.captured_inputs))
            else:
                result = fn(**feeds)
        except tf.errors.OpError as e:
            raise from_exception(e) from None
        except (TypeError, ValueError) as e:
            raise invalid_argument(str(e)) from None
        wanted = list(output_filter) or spec.outputs
        outputs: dict[str, np.ndarray] = {}
        for alias in wanted:
            value = result[alias].numpy()
            if sig.outputs[alias].dtype == DT_STRING and not isinstance(value, np.ndarray):
                value = np.array(value, dtype=object)
            outputs[alias] = np.asarray(value)
        return signature_name, outputs

    def warmup(self, iterations: int = 1) -> int:
        """Replay ``assets.extra/tf_serving_warmup_requests`` (if any); return the records read.

        Raises:
            ServingError: when a record fails or there are more than 1000 of them.
        """
        path = self.path / WARMUP_FILE
        if not path.is_file():
            return 0
        import tensorflow as tf
        from tensorflow_serving.apis import prediction_log_pb2

        records = 0
        try:
            raw = list(tf.data.TFRecordDataset(str(path)).as_numpy_iterator())
        except tf.errors.OpError as e:
            raise from_exception(e) from None
        if len(raw) > MAX_WARMUP_RECORDS:
            raise invalid_argument(
                f"Number of warmup records exceeds the maximum ({MAX_WARMUP_RECORDS}) at {path}"
            )
        for data in raw:
            log = prediction_log_pb2.PredictionLog()
            log.ParseFromString(data)
            kind = log.WhichOneof("log_type")
            if kind != "predict_log":
                raise ServingError("UNIMPLEMENTED", f"Unsupported log_type for warmup: {kind}")
            request = log.predict_log.request
            inputs = {alias: ndarray_from_proto(t) for alias, t in request.inputs.items()}
            for _ in range(max(iterations, 1)):
                self.run(request.model_spec.signature_name, inputs, list(request.output_filter))
            records += 1
        return records

    def unload(self) -> None:
        """Drop the references to the loaded graph so its memory can be reclaimed."""
        self._functions = {}
        self._flat_calls = {}
        self._loaded = None
