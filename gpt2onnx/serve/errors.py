"""Errors the server answers with, each carrying its HTTP status and OpenAI error type.

``EngineError`` subclasses are raised (and counted in the metrics) by the engine itself;
the others are raised by the HTTP layer before a request reaches the engine.
"""

from __future__ import annotations

from gpt2onnx.errors import Gpt2OnnxError


class ServeError(Gpt2OnnxError):
    """A request the server cannot complete; ``to_body()`` is the OpenAI error shape."""

    status = 500
    type = "server_error"
    code: str | None = None
    outcome = "error"  # label of gpt2onnx_requests_total

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class BadRequestError(ServeError):
    status, type, code, outcome = 400, "invalid_request_error", "invalid_value", "bad_request"


class UnauthorizedError(ServeError):
    status, type, code, outcome = 401, "authentication_error", "invalid_api_key", "unauthorized"


class ModelNotFoundError(ServeError):
    status, type, code, outcome = 404, "invalid_request_error", "model_not_found", "bad_request"


class PayloadTooLargeError(ServeError):
    status, type, code, outcome = 413, "invalid_request_error", "request_too_large", "too_large"


class BodyTimeoutError(ServeError):
    status, type, code, outcome = 408, "invalid_request_error", "body_timeout", "bad_request"


class EngineError(ServeError):
    """Raised by the engine for a request it accepted or refused."""


class QueueFullError(EngineError):
    status, type, code, outcome = 429, "rate_limit_error", "queue_full", "rejected"
    retry_after_s = 1


class NotReadyError(EngineError):
    status, type, code, outcome = 503, "service_unavailable", "model_loading", "unavailable"


class ShuttingDownError(EngineError):
    status, type, code, outcome = 503, "service_unavailable", "shutting_down", "unavailable"


class RequestTimeoutError(EngineError):
    status, type, code, outcome = 504, "timeout_error", "timeout", "timeout"


class ModelRunError(EngineError):
    status, type, code, outcome = 500, "server_error", "model_run_failed", "error"
