"""The error a front end answers a refused request with."""


class RequestError(Exception):
    """A request the server refuses; `status` is the HTTP status (400, 413, ...)."""

    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.message, self.status, self.param = message, status, param
