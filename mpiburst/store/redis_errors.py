"""redis-py's exceptions turned into mpiburst's: one sentence saying what went wrong and what to do.

Only the Redis-protocol stores (:mod:`~mpiburst.store.redis_store`,
:mod:`~mpiburst.store.cluster_store`) see redis-py; every public method of
theirs is wrapped (:func:`public_methods_translated`) so that nothing above
the store catches a redis-py exception.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import Any, TypeVar

import redis

from ..errors import AuthenticationError, MpiburstError, ServerError, TierConnectionError, TierFullError

_FULL = ("the tier is full (the server reached its memory limit); sync and purge data, "
         "or start the run with a larger --capacity.")


def as_mpiburst_error(exc: BaseException) -> MpiburstError:
    """Return the mpiburst error that tells a person what a redis-py (or socket) exception means."""
    if isinstance(exc, redis.AuthenticationError):
        return AuthenticationError(f"the tier's server refused the run's credentials ({exc}); "
                                   "check that the conf file belongs to the running server.")
    if isinstance(exc, redis.OutOfMemoryError) or (isinstance(exc, redis.ResponseError)
                                                    and str(exc).startswith("OOM")):
        return TierFullError(_FULL)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return TierConnectionError(f"lost the connection to the tier's server ({exc or type(exc).__name__}); "
                                   "check that the run is up with 'mpiburst status' and read its server log.")
    return ServerError(f"the tier's server refused a request ({exc}); read its server log.")


_F = TypeVar("_F", bound=Callable[..., Any])


def translated(fn: _F) -> _F:
    """Wrap ``fn`` (a function or generator function) so it raises mpiburst errors, never redis-py's."""
    raw = (redis.RedisError, OSError)
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def generator(*args: Any, **kwargs: Any) -> Any:
            try:
                yield from fn(*args, **kwargs)
            except raw as exc:
                raise as_mpiburst_error(exc) from exc
        return generator  # type: ignore[return-value]

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except raw as exc:
            raise as_mpiburst_error(exc) from exc
    return call  # type: ignore[return-value]


_C = TypeVar("_C", bound=type)


def public_methods_translated(cls: _C) -> _C:
    """Class decorator: apply :func:`translated` to every public method ``cls`` defines."""
    for name, value in list(vars(cls).items()):
        if not name.startswith("_") and inspect.isfunction(value):
            setattr(cls, name, translated(value))
    return cls

