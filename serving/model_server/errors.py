"""Errors as TensorFlow Serving reports them: a canonical status code and a message.

TF Serving computes every answer as a ``tensorflow::Status``; the gRPC front end passes
the code through unchanged, and the REST front end maps it to an HTTP status
(``http_server.cc: ToHTTPStatusCode``) and writes the message as ``{"error": "..."}``.
Keeping one error type with the canonical code lets both front ends of the stand-in
answer exactly as the real server does from the same place in the code.
"""

from __future__ import annotations

# Canonical codes (google.rpc.Code / tensorflow::error::Code): the number is what
# StatusProto.error_code carries, the name is what JSON shows.
CODES: dict[str, int] = {
    "OK": 0,
    "CANCELLED": 1,
    "UNKNOWN": 2,
    "INVALID_ARGUMENT": 3,
    "DEADLINE_EXCEEDED": 4,
    "NOT_FOUND": 5,
    "ALREADY_EXISTS": 6,
    "PERMISSION_DENIED": 7,
    "RESOURCE_EXHAUSTED": 8,
    "FAILED_PRECONDITION": 9,
    "ABORTED": 10,
    "OUT_OF_RANGE": 11,
    "UNIMPLEMENTED": 12,
    "INTERNAL": 13,
    "UNAVAILABLE": 14,
    "DATA_LOSS": 15,
    "UNAUTHENTICATED": 16,
}
CODE_NAMES: dict[int, str] = {v: k for k, v in CODES.items()}

# TF Serving's ToHTTPStatusCode: note FAILED_PRECONDITION and OUT_OF_RANGE are 400, not 412.
HTTP_STATUS: dict[str, int] = {
    "OK": 200,
    "CANCELLED": 499,
    "UNKNOWN": 500,
    "INVALID_ARGUMENT": 400,
    "DEADLINE_EXCEEDED": 504,
    "NOT_FOUND": 404,
    "ALREADY_EXISTS": 409,
    "PERMISSION_DENIED": 403,
    "RESOURCE_EXHAUSTED": 429,
    "FAILED_PRECONDITION": 400,
    "ABORTED": 409,
    "OUT_OF_RANGE": 400,
    "UNIMPLEMENTED": 501,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DATA_LOSS": 500,
    "UNAUTHENTICATED": 401,
}


class ServingError(Exception):
    """A failed request or load, with the canonical code TF Serving would give it.

    Args:
        code: a canonical code name, e.g. ``"NOT_FOUND"``.
        message: the text clients see (TF Serving's wording where we know it).
    """

    def __init__(self, code: str, message: str) -> None:
        if code not in CODES:
            raise ValueError(f"unknown status code {code!r}")
        super().__init__(message)
        self.code = code
        self.message = message

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self.code]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


def invalid_argument(message: str) -> ServingError:
    return ServingError("INVALID_ARGUMENT", message)


def not_found(message: str) -> ServingError:
    return ServingError("NOT_FOUND", message)


def failed_precondition(message: str) -> ServingError:
    return ServingError("FAILED_PRECONDITION", message)


def from_exception(e: BaseException) -> ServingError:
    """The status of an exception raised while loading or running a model.

    TensorFlow's ``OpError`` carries the same canonical code the C++ runtime would
    return; anything else is UNKNOWN, as a non-TF failure in TF Serving would be.
    """
    if isinstance(e, ServingError):
        return e
    code = getattr(e, "error_code", None)
    message = getattr(e, "message", None) or str(e)
    if isinstance(code, int) and code in CODE_NAMES and code != 0:
        return ServingError(CODE_NAMES[code], message)
    return ServingError("UNKNOWN", message)
