"""Errors that carry their own reply: the status code, the headers, and a detail a person can
act on.

Each failure of the domain is a subclass of `ApiError` that names its status (and, where a
retry will help, its Retry-After). `main.py` registers one handler for them all, and the
OpenAPI responses of every route are generated from the classes it can raise (`responses`),
so an error without a status, or a status without documentation, cannot exist.
"""

from typing import Any, ClassVar

from models import ErrorDetail

Responses = dict[int | str, dict[str, Any]]


class ApiError(Exception):
    """A request that ends in an error reply; `message` becomes its `detail`."""

    status_code: ClassVar[int] = 500
    retry_after_s: ClassVar[int | None] = None  # seconds, for errors a retry will resolve
    documented: ClassVar[str] = "An error"  # when it is answered, for the OpenAPI document

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    @property
    def headers(self) -> dict[str, str] | None:
        if self.retry_after_s is None:
            return None
        return {"Retry-After": str(self.retry_after_s)}


class DatabaseUnavailableError(ApiError):
    status_code = 503
    retry_after_s = 5
    documented = "The database is unavailable or did not answer in time (Retry-After)"

    def __init__(self) -> None:
        super().__init__("The database is unavailable or did not answer in time; try again shortly")


class LostRaceError(ApiError):
    status_code = 409
    documented = "The request lost a race with a concurrent change and changed nothing"

    def __init__(self) -> None:
        super().__init__(
            "This request lost a race with a concurrent change to the same data and changed "
            "nothing; read the resource again, then retry if it is still needed"
        )


def responses(*errors: type[ApiError]) -> Responses:
    """The OpenAPI `responses` of a route that can raise `errors`: one entry per status code,
    its description made of each error's `documented` line."""
    described: dict[int, list[str]] = {}
    for error in errors:
        lines = described.setdefault(error.status_code, [])
        if error.documented not in lines:
            lines.append(error.documented)
    return {
        code: {"model": ErrorDetail, "description": "; ".join(lines)}
        for code, lines in sorted(described.items())
    }
