"""The one error type the HTTP layer turns into ``{"message": ..., "code": ...}`` JSON."""

from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, **extra: object) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.extra = extra


def unauthorized() -> ApiError:
    return ApiError(401, "UNAUTHORIZED", "Unauthorized")


def validation(path: str, expected: str, got: object) -> ApiError:
    """zod's wording, which better-auth clients may display: ``[body.keyId] Invalid input: ...``."""
    return ApiError(400, "VALIDATION_ERROR", f"[{path}] Invalid input: expected {expected}, received {type_name(got)}")


_MISSING = object()


def type_name(value: object) -> str:
    if value is _MISSING:
        return "undefined"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


MISSING = _MISSING
