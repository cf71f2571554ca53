"""Tensors between wire formats and NumPy: ``TensorProto`` for gRPC, JSON for REST.

The REST rules follow TF Serving's ``util/json_tensor.cc`` closely, because clients depend
on them: a request is either *row* format (``{"instances": [...]}``, one element per
example, all batched along a new first dimension) or *columnar* format
(``{"inputs": ...}``, whole tensors); the answer uses the same format
(``predictions`` or ``outputs``). With one input the element may be a bare value; with
several it is an object keyed by input name. JSON numbers become the dtype the
signature declares (an int32 input refuses ``1.5``; a float input accepts ``1``), strings
are UTF-8 text, and binary strings travel as ``{"b64": "..."}``. An output whose name ends
in ``_bytes`` is written as ``{"b64": ...}`` too. Float outputs are written in the
shortest form that reads back to the same float32 (``0.1``, not ``0.10000000149``).

No TensorFlow import here: ``tensor_pb2``/``types_pb2`` come with the serving protos.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from serving.model_server.errors import ServingError, invalid_argument

# DataType enum values (tensorflow/core/framework/types.proto) and TF's DataTypeString.
DT_FLOAT, DT_DOUBLE, DT_INT32, DT_UINT8, DT_INT16, DT_INT8, DT_STRING = 1, 2, 3, 4, 5, 6, 7
DT_INT64, DT_BOOL, DT_UINT16, DT_HALF, DT_UINT32, DT_UINT64 = 9, 10, 17, 19, 22, 23

_NUMPY: dict[int, Any] = {
    DT_FLOAT: np.float32,
    DT_DOUBLE: np.float64,
    DT_INT32: np.int32,
    DT_UINT8: np.uint8,
    DT_INT16: np.int16,
    DT_INT8: np.int8,
    DT_STRING: object,
    DT_INT64: np.int64,
    DT_BOOL: np.bool_,
    DT_UINT16: np.uint16,
    DT_HALF: np.float16,
    DT_UINT32: np.uint32,
    DT_UINT64: np.uint64,
}
_ENUMS: dict[np.dtype[Any], int] = {np.dtype(t): e for e, t in _NUMPY.items() if t is not object}
_NAMES: dict[int, str] = {
    DT_FLOAT: "float",
    DT_DOUBLE: "double",
    DT_INT32: "int32",
    DT_UINT8: "uint8",
    DT_INT16: "int16",
    DT_INT8: "int8",
    DT_STRING: "string",
    DT_INT64: "int64",
    DT_BOOL: "bool",
    DT_UINT16: "uint16",
    DT_HALF: "half",
    DT_UINT32: "uint32",
    DT_UINT64: "uint64",
}
_INT_RANGES: dict[int, tuple[int, int]] = {
    # rapidjson's IsInt / IsInt64 / IsUint / IsUint64: the JSON integer must fit the C type.
    DT_INT32: (-(2**31), 2**31 - 1),
    DT_INT16: (-(2**31), 2**31 - 1),
    DT_INT8: (-(2**31), 2**31 - 1),
    DT_UINT8: (-(2**31), 2**31 - 1),
    DT_INT64: (-(2**63), 2**63 - 1),
    DT_UINT32: (0, 2**32 - 1),
    DT_UINT64: (0, 2**64 - 1),
}
_FLOAT_MAX_INT = {DT_FLOAT: 2**24 - 1, DT_DOUBLE: 2**53 - 1}
_FLOAT_MAX = {DT_FLOAT: float(np.finfo(np.float32).max), DT_DOUBLE: float(np.finfo(np.float64).max)}

ROW, COLUMNAR = "row", "columnar"
# TensorFlow's compact form (one value, or none, standing for a tensor filled with it) is
# expanded only up to this many elements: a declared shape is otherwise bounded by the values
# the request carries, so a few bytes can never ask for gigabytes.
MAX_FILL_ELEMENTS = 1 << 20


def dtype_name(dtype: int) -> str:
    """TF's ``DataTypeString``: ``float`` for DT_FLOAT, ``string`` for DT_STRING, ..."""
    return _NAMES.get(dtype, f"type{dtype}")


def numpy_dtype(dtype: int) -> Any:
    if dtype not in _NUMPY:
        raise ServingError("UNIMPLEMENTED", f"Unsupported tensor type: {dtype_name(dtype)}")
    return _NUMPY[dtype]


def dtype_enum(array: np.ndarray) -> int:
    """The DataType of a NumPy array (object and bytes/str arrays are DT_STRING)."""
    enum = _ENUMS.get(array.dtype)  # one lookup: the model server asks this for every input
    if enum is not None:
        return enum
    if array.dtype.kind in ("O", "S", "U"):
        return DT_STRING
    raise ServingError("UNIMPLEMENTED", f"Unsupported NumPy dtype: {array.dtype}")


# --- TensorProto (gRPC) ---------------------------------------------------------------


def ndarray_from_proto(proto: Any) -> np.ndarray:
    """A NumPy array from a ``TensorProto`` (``tensor_content`` or the typed ``*_val`` fields).

    Accepts what ``tf.make_tensor_proto`` writes and what TF Serving writes, including a
    single value standing for a filled tensor, as TensorFlow's ``Tensor::FromProto`` does
    (up to ``MAX_FILL_ELEMENTS``). A negative dimension, or a shape that needs more values
    than the proto carries (beyond that fill), is INVALID_ARGUMENT before anything is allocated.
    """
    dtype = proto.dtype
    np_type = numpy_dtype(dtype)
    shape = [d.size for d in proto.tensor_shape.dim]
    if any(d < 0 for d in shape):
        raise invalid_argument(f"Tensor shape {shape} has a negative dimension")
    count = math.prod(shape)  # 1 for a scalar; np.prod's array round trip, paid per input, is slower
    carried = _carried(proto, dtype, np_type)
    if count > carried and (carried > 1 or count > MAX_FILL_ELEMENTS):
        raise invalid_argument(f"Tensor has {carried} values but shape {shape} needs {count}")
    if dtype == DT_STRING:
        values: Any = list(proto.string_val)
        array = np.empty(len(values), dtype=object)
        array[:] = values
    elif proto.tensor_content:
        array = np.frombuffer(proto.tensor_content, dtype=np_type).copy()
    elif dtype == DT_HALF:
        array = np.array(proto.half_val, dtype=np.uint16).view(np.float16)
    else:
        field = {
            DT_FLOAT: "float_val",
            DT_DOUBLE: "double_val",
            DT_INT64: "int64_val",
            DT_BOOL: "bool_val",
            DT_UINT32: "uint32_val",
            DT_UINT64: "uint64_val",
        }.get(dtype, "int_val")
        array = np.array(getattr(proto, field), dtype=np_type)
    if array.size == count:
        return array.reshape(shape)
    if array.size == 1 and count > 0:
        return np.full(shape, array[0], dtype=array.dtype)
    if array.size == 0 and count > 0:
        return np.zeros(shape, dtype=array.dtype) if dtype != DT_STRING else np.full(shape, b"", dtype=object)
    raise invalid_argument(f"Tensor has {array.size} values but shape {shape} needs {count}")


def _carried(proto: Any, dtype: int, np_type: Any) -> int:
    """How many values a ``TensorProto`` carries, counted without decoding them."""
    if dtype == DT_STRING:
        return len(proto.string_val)
    if proto.tensor_content:
        return len(proto.tensor_content) // np.dtype(np_type).itemsize
    field = {
        DT_FLOAT: "float_val",
        DT_DOUBLE: "double_val",
        DT_INT64: "int64_val",
        DT_BOOL: "bool_val",
        DT_UINT32: "uint32_val",
        DT_UINT64: "uint64_val",
        DT_HALF: "half_val",
    }.get(dtype, "int_val")
    return len(getattr(proto, field))


def proto_from_ndarray(array: np.ndarray, dtype: int | None = None, into: Any = None) -> Any:
    """A ``TensorProto`` with typed ``*_val`` fields, as TF Serving writes outputs (``AsProtoField``).

    ``into``: an empty ``TensorProto`` to fill (a response's output, written in place rather
    than built apart and copied in); a new one when None.
    """
    from tensorflow.core.framework import tensor_pb2

    dtype = dtype if dtype is not None else dtype_enum(array)
    proto = tensor_pb2.TensorProto() if into is None else into
    proto.dtype = dtype
    for size in array.shape:
        proto.tensor_shape.dim.add(size=int(size))
    flat = array.reshape(-1)
    if dtype == DT_STRING:
        proto.string_val.extend(_as_bytes(v) for v in flat)
    elif dtype == DT_FLOAT:
        proto.float_val.extend(flat.astype(np.float32).tolist())
    elif dtype == DT_DOUBLE:
        proto.double_val.extend(flat.astype(np.float64).tolist())
    elif dtype == DT_INT64:
        proto.int64_val.extend(flat.astype(np.int64).tolist())
    elif dtype == DT_BOOL:
        proto.bool_val.extend(flat.astype(bool).tolist())
    elif dtype == DT_HALF:
        proto.half_val.extend(flat.astype(np.float16).view(np.uint16).tolist())
    elif dtype == DT_UINT32:
        proto.uint32_val.extend(flat.astype(np.uint32).tolist())
    elif dtype == DT_UINT64:
        proto.uint64_val.extend(flat.astype(np.uint64).tolist())
    else:
        proto.int_val.extend(flat.astype(np.int64).tolist())
    return proto


def _as_bytes(v: Any) -> bytes:
    if isinstance(v, bytes):
        return v
    if isinstance(v, str):
        return v.encode("utf-8")
    return str(v).encode("utf-8")


# --- JSON (REST) ----------------------------------------------------------------------


def _js(val: Any) -> str:
    """A JSON value as TF Serving prints it inside error messages."""
    return json.dumps(val, separators=(",", ":"))


def _json_type(val: Any) -> str:
    if val is None:
        return "Null"
    if val is True:
        return "True"
    if val is False:
        return "False"
    if isinstance(val, dict):
        return "Object"
    if isinstance(val, list):
        return "Array"
    if isinstance(val, str):
        return "String"
    return "Number"


def _type_error(val: Any, dtype: int) -> ServingError:
    return invalid_argument(
        f"JSON Value: {_js(val)} Type: {_json_type(val)} is not of expected type: {dtype_name(dtype)}"
    )


def _is_b64(val: Any) -> bool:
    return isinstance(val, dict) and len(val) == 1 and isinstance(val.get("b64"), str)


def _is_number(val: Any) -> bool:
    return isinstance(val, int | float) and not isinstance(val, bool)


def _scalar(val: Any, dtype: int) -> Any:
    """One JSON leaf as a value of ``dtype`` (json_tensor.cc: ``AddValueToTensor``)."""
    if isinstance(val, dict):
        if dtype != DT_STRING:
            raise _type_error(val, dtype)
        if not _is_b64(val):
            raise invalid_argument(f"JSON Value: {_js(val)} not formatted correctly for base64 data")
        try:
            return base64.b64decode(val["b64"], validate=True)
        except (binascii.Error, ValueError):
            raise invalid_argument("Unable to base64 decode") from None
    if dtype in (DT_FLOAT, DT_DOUBLE):
        if not _is_number(val):
            raise _type_error(val, dtype)
        lossless = (
            abs(val) <= _FLOAT_MAX_INT[dtype]
            if isinstance(val, int)
            else (not np.isfinite(val) or abs(val) <= _FLOAT_MAX[dtype])
        )
        if not lossless:
            raise invalid_argument(
                f"Cannot convert JSON value: {_js(val)} to {dtype_name(dtype)} without loss of precision."
            )
        return val
    if dtype in _INT_RANGES:
        lo, hi = _INT_RANGES[dtype]
        if not isinstance(val, int) or isinstance(val, bool) or not lo <= val <= hi:
            raise _type_error(val, dtype)
        return val
    if dtype == DT_STRING:
        if not isinstance(val, str):
            raise _type_error(val, dtype)
        return val.encode("utf-8")
    if dtype == DT_BOOL:
        if not isinstance(val, bool):
            raise _type_error(val, dtype)
        return val
    raise ServingError("UNIMPLEMENTED", f"Conversion of JSON Value: {_js(val)} to type: {dtype_name(dtype)}")


def _dense_shape(val: Any) -> list[int]:
    # The shape is read off the first element at every level, then every list is checked.
    shape: list[int] = []
    while isinstance(val, list):
        shape.append(len(val))
        if not val:
            break
        val = val[0]
    return shape


def _fill(val: Any, level: int, shape: list[int], dtype: int, out: list[Any]) -> None:
    rank = len(shape)
    if not isinstance(val, list):
        if level != rank:
            raise invalid_argument(
                f"JSON Value: {_js(val)} found at incorrect level: {level + 1} in the JSON DOM. "
                f"Expected at level: {rank}"
            )
        out.append(_scalar(val, dtype))
        return
    if level >= rank:
        raise invalid_argument(f"Encountered list at unexpected level: {level} expected < {rank}")
    if len(val) != shape[level]:
        raise invalid_argument(
            f"Encountered list at unexpected size: {len(val)} at level: {level} expected size: {shape[level]}"
        )
    for v in val:
        _fill(v, level + 1, shape, dtype, out)


def _json_to_array(val: Any, dtype: int) -> np.ndarray:
    shape = _dense_shape(val)
    values: list[Any] = []
    _fill(val, 0, shape, dtype, values)
    np_type = numpy_dtype(dtype)
    if np_type is object:
        array = np.empty(len(values), dtype=object)
        array[:] = values
        return array.reshape(shape)
    return np.array(values, dtype=np_type).reshape(shape)


def _shape_str(shape: tuple[int, ...] | list[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def _instances(items: list[Any], input_dtypes: Mapping[str, int]) -> dict[str, np.ndarray]:
    if not isinstance(items[0], dict) and len(input_dtypes) > 1:
        raise invalid_argument(
            "instances is a plain list, but expecting list of objects as multiple "
            "input tensors required as per tensorinfo_map"
        )

    def is_object(v: Any) -> bool:
        return isinstance(v, dict) and not _is_b64(v)

    as_objects = is_object(items[0])
    names = sorted(input_dtypes)
    rows: dict[str, list[np.ndarray]] = {}

    def add(value: Any, name: str) -> None:
        if name not in input_dtypes:
            raise invalid_argument(f"JSON object: does not have named input: {name}")
        array = _json_to_array(value, input_dtypes[name])
        seen = rows.setdefault(name, [])
        if seen and seen[0].size != array.size:
            raise invalid_argument(f"Expecting tensor size: {seen[0].size} but got: {array.size}")
        if seen and seen[0].shape != array.shape:
            raise invalid_argument(
                f"Expecting shape {_shape_str(seen[0].shape)} but got: {_shape_str(array.shape)}"
            )
        seen.append(array)

    for i, elem in enumerate(items):
        if as_objects:
            if not is_object(elem):
                raise invalid_argument(f"Expecting object but got list at item {i} of input list")
            for name, value in elem.items():
                try:
                    add(value, name)
                except ServingError as e:
                    raise invalid_argument(
                        f"Failed to process element: {i} key: {name} of 'instances' list. "
                        f"Error: {e.code}: {e.message}"
                    ) from None
            if set(elem) != set(names):
                raise invalid_argument(
                    f"Failed to process element: {i} of 'instances' list. JSON object: {_js(elem)} "
                    f"keys must be equal to: {','.join(names)}"
                )
        else:
            if is_object(elem):
                raise invalid_argument(f"Expecting value/list but got object at item {i} of input list")
            try:
                add(elem, names[0])
            except ServingError as e:
                raise invalid_argument(
                    f"Failed to process element: {i} of 'instances' list. Error: {e.code}: {e.message}"
                ) from None
    return {name: np.stack(arrays) for name, arrays in rows.items()}


def _columnar(val: Any, input_dtypes: Mapping[str, int]) -> dict[str, np.ndarray]:
    if not isinstance(val, dict) or _is_b64(val):
        if len(input_dtypes) > 1:
            raise invalid_argument(
                "inputs is a plain value/list, but expecting an object as multiple "
                "input tensors required as per tensorinfo_map"
            )
        name = next(iter(input_dtypes))
        return {name: _json_to_array(val, input_dtypes[name])}
    out: dict[str, np.ndarray] = {}
    # Only the signature's inputs are read; extra keys are ignored, as TF Serving does.
    for name in sorted(input_dtypes):
        if name not in val:
            raise invalid_argument(f"Missing named input: {name} in 'inputs' object.")
        out[name] = _json_to_array(val[name], input_dtypes[name])
    return out


def parse_predict_body(body: bytes) -> dict[str, Any]:
    """Parse a REST request body into a JSON object (``ParseJson`` + ``FillSignature``)."""
    if not body.strip():
        raise invalid_argument("JSON Parse error: The document is empty")
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        pos = getattr(e, "pos", getattr(e, "start", 0))
        msg = getattr(e, "msg", str(e))
        raise invalid_argument(f"JSON Parse error: {msg} at offset: {pos}") from None
    if not isinstance(doc, dict):
        raise invalid_argument(f"JSON Value: {_js(doc)} Is not object")
    if "signature_name" in doc and not isinstance(doc["signature_name"], str):
        raise invalid_argument(
            f"JSON Value: {_js(doc)} not formatted correctly. 'signature_name' key must be a string value."
        )
    return doc


def tensors_from_json(
    doc: Mapping[str, Any], input_dtypes: Mapping[str, int], signature_name: str
) -> tuple[str, dict[str, np.ndarray]]:
    """Input tensors from a parsed request (``FillPredictRequestFromJson``).

    Args:
        doc: the request object.
        input_dtypes: the signature's inputs, ``{alias: DataType}``.
        signature_name: for the error message when the signature has no inputs.

    Returns:
        ``(format, tensors)`` where format is ``"row"`` or ``"columnar"``.
    """
    if not input_dtypes:
        raise invalid_argument(f"Failed to get input map for signature: {signature_name or 'DEFAULT'}")
    has_instances, has_inputs = "instances" in doc, "inputs" in doc
    if has_instances and has_inputs:
        raise invalid_argument(
            f"JSON Value: {_js(doc)} Not formatted correctly expecting only one of 'inputs' or "
            "'instances' keys to exist "
        )
    if has_instances:
        items = doc["instances"]
        if not isinstance(items, list):
            raise invalid_argument(f"JSON Value: {_js(doc)} Excepting 'instances' to be an list/array")
        if not items:
            raise invalid_argument(f"JSON Value: {_js(doc)} No values in 'instances' array")
        return ROW, _instances(items, input_dtypes)
    if has_inputs:
        return COLUMNAR, _columnar(doc["inputs"], input_dtypes)
    raise invalid_argument("Missing 'inputs' or 'instances' key")


def _json_values(name: str, array: np.ndarray) -> Any:
    """Nested lists of JSON-ready values for one tensor (or one row of it)."""
    if array.dtype == object or array.dtype.kind in ("S", "U"):
        as_b64 = name.endswith("_bytes")

        def conv(v: Any) -> Any:
            b = _as_bytes(v)
            if as_b64:
                return {"b64": base64.b64encode(b).decode("ascii")}
            return b.decode("utf-8", errors="replace")

        flat = [conv(v) for v in array.reshape(-1)]
        return _reshape(flat, array.shape)
    if array.dtype in (np.float32, np.float16):
        # Shortest decimal that reads back as the same float32 (TF Serving's WriteDecimal).
        return array.astype(np.float32).astype(str).astype(np.float64).tolist()
    return array.tolist()


def _reshape(flat: list[Any], shape: tuple[int, ...]) -> Any:
    holder = np.empty(len(flat), dtype=object)
    holder[:] = flat
    return holder.reshape(shape).tolist()


def json_from_tensors(outputs: Mapping[str, np.ndarray], fmt: str) -> dict[str, Any]:
    """The REST answer for output tensors (``MakeJsonFromTensors``).

    Row format: ``{"predictions": [...]}`` with one element per example (a bare value
    for one output, an object for several); every output must share the batch size.
    Columnar: ``{"outputs": value}`` for one output, ``{"outputs": {name: value}}`` else.
    """
    if not outputs:
        raise invalid_argument("Cannot convert empty tensor map to JSON")
    names = sorted(outputs)
    if fmt == COLUMNAR:
        if len(names) == 1:
            return {"outputs": _json_values(names[0], outputs[names[0]])}
        return {"outputs": {n: _json_values(n, outputs[n]) for n in names}}
    batch = -1
    for n in names:
        if outputs[n].ndim == 0:
            raise invalid_argument(f"Tensor name: {n} has no shape information ")
        size = outputs[n].shape[0]
        if batch >= 0 and size != batch:
            raise invalid_argument(f"Tensor name: {n} has inconsistent batch size: {size} expecting: {batch}")
        batch = size
    columns = {n: _json_values(n, outputs[n]) for n in names}
    if len(names) == 1:
        return {"predictions": columns[names[0]]}
    return {"predictions": [{n: columns[n][i] for n in names} for i in range(batch)]}
