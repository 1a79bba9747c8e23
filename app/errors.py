"""Domain exceptions of the API and the one place that maps each to an HTTP answer.

Code below the routes raises these; `install_error_handlers` registers one handler per
exception, so every error leaves as JSON `{"detail": "..."}` with its status code, and
nothing a client sends can produce a 500 or a traceback.
"""

from __future__ import annotations

import logging

import redis
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from models.study.cache import ReportUnavailable, StudyNotReady
from worker.jobs import JobAlreadyFinished, JobNotFound, StudyNotFound, TooManyJobs

log = logging.getLogger(__name__)


class ModelNotFound(LookupError):
    """No trained model has this id."""


class NoModelTrained(LookupError):
    """A model was asked for by default, and none has been trained yet."""


class ModelUnavailable(RuntimeError):
    """A listed model's checkpoint cannot be loaded (a server-side fault, not the client's)."""


class InvalidImage(ValueError):
    """Base of the upload errors: the file cannot be turned into a digit."""


class EmptyImage(InvalidImage):
    """The uploaded file has no bytes."""


class UnreadableImage(InvalidImage):
    """Pillow cannot decode the file: not an image, or a format it does not know."""


class ImageTooLarge(InvalidImage):
    """The image has more pixels than the limit (a decompression bomb, or a huge photo)."""


class ImageTooThin(InvalidImage):
    """One side of the image is many times the other: no digit fits, and padding it to a
    square would take memory out of proportion to its pixels."""


class NoDigitFound(InvalidImage):
    """The image decodes but is blank: nothing stands out from the background."""


class InvalidMask(InvalidImage):
    """The mask of POST /impute is missing, of another size, empty or full."""


class FigureNotFound(LookupError):
    """A study report has no figure of this name."""


class QueueUnavailable(RuntimeError):
    """The job was recorded but could not be handed to the broker."""


class NotAuthenticated(PermissionError):
    """A write endpoint needs `Authorization: Bearer <IWAE_API_TOKEN>`."""


class NotReady(RuntimeError):
    """A dependency of the service (storage, job store, broker) does not answer."""


class Overloaded(RuntimeError):
    """Too many model calls at once: the wait queue is full, or the wait passed the deadline.

    Answered 503 with `Retry-After: retry_after_s`, so that clients back off.
    """

    retry_after_s = 1


class TooManyStreams(RuntimeError):
    """IWAE_MAX_EVENT_STREAMS event streams are open: 429, come back later (or poll)."""

    retry_after_s = 5


class DeadlineExceeded(Overloaded):
    """A model call ran past IWAE_INFERENCE_TIMEOUT_S; it stopped at the next chunk."""


class ClientDisconnected(ConnectionError):
    """The client closed the connection; the model call stopped at the next chunk."""


class UnsafeExposure(ValueError):
    """`iwae serve` was asked to listen on a non-loopback address without a token."""


# One status per exception; the handler below turns any of them into {"detail": str(exc)}.
STATUS_CODES: dict[type[Exception], int] = {
    EmptyImage: 400,
    NoDigitFound: 400,
    InvalidMask: 400,
    NotAuthenticated: 401,
    ModelNotFound: 404,
    JobNotFound: 404,
    StudyNotFound: 404,
    FigureNotFound: 404,
    NoModelTrained: 409,
    JobAlreadyFinished: 409,
    StudyNotReady: 409,
    ImageTooLarge: 413,
    ImageTooThin: 422,
    TooManyJobs: 429,
    TooManyStreams: 429,
    UnreadableImage: 415,
    ClientDisconnected: 499,  # nginx's "client closed request": nobody reads it, metrics do
    ModelUnavailable: 500,
    NotReady: 503,
    ReportUnavailable: 503,
    QueueUnavailable: 503,
    Overloaded: 503,
}


def _detail(request: Request, exc: Exception) -> JSONResponse:
    """`{"detail": str(exc)}`: the messages of these exceptions are written for clients and
    hold no host, port or path; the cause of a server-side one is logged, never sent."""
    status = next(STATUS_CODES[t] for t in type(exc).__mro__ if t in STATUS_CODES)
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif (retry_after_s := getattr(exc, "retry_after_s", None)) is not None:
        headers = {"Retry-After": str(retry_after_s)}  # load shedding: when to come back
    if status == 500:
        log.error("%s %s: %s", request.method, request.url.path, exc, exc_info=exc)
    elif status > 500:  # load shedding or an outage: expected, no traceback
        log.warning("%s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": str(exc)}, status_code=status, headers=headers)


def _store_unavailable(request: Request, exc: Exception) -> JSONResponse:
    """The Redis of the distributed mode (job store and broker) does not answer.

    Its message names the Redis host and port: logged here, never sent to the client.
    """
    log.warning("job store unreachable in %s %s: %s", request.method, request.url.path, exc)
    return JSONResponse({"detail": "job store unavailable"}, status_code=503)


def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # Handlers run outside the `except` block: the traceback must be passed explicitly.
    log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
    return JSONResponse({"detail": "internal server error"}, status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in STATUS_CODES:
        app.add_exception_handler(exc_type, _detail)
    app.add_exception_handler(redis.RedisError, _store_unavailable)
    app.add_exception_handler(Exception, _unexpected)
