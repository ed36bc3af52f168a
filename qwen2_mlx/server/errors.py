"""Errors in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}`` with the
status code OpenAI uses, so OpenAI clients raise their usual exceptions (BadRequestError,
AuthenticationError, NotFoundError, RateLimitError...)."""

from __future__ import annotations

from starlette.responses import JSONResponse


class APIError(Exception):
    """An error to answer with: HTTP status, message, OpenAI error type, param and code."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def model_not_found(name: object) -> APIError:
    return APIError(404, f"The model {name!r} does not exist: this server serves only the "
                    "models it was started with (see GET /v1/models)", param="model",
                    code="model_not_found")
