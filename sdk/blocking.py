"""The synchronous face of an async object, generated at attribute access.

`Blocking(portal, target)` offers every public method of `target` as a plain
call with the same signature: the call runs on the portal's event loop (in
its thread) and blocks until it is done. What comes back is translated once
more: an async iterator becomes an iterator (each item fetched through the
portal, and the async one closed on the loop when the caller stops early), an
object with async methods (`client.jobs`) becomes a `Blocking` of its own.
So the sync `Client` needs no twin of each method, and a method added to
`AsyncClient` (or `Jobs`, `Sessions`) is there at once.

The cost is static typing: mypy sees the sync face's attributes as `Any`
(the async classes carry the types).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from anyio.from_thread import BlockingPortal


class Blocking:
    __slots__ = ("_portal", "_target", "_open")

    def __init__(self, portal: BlockingPortal, target: object, is_open: Callable[[], bool] = lambda: True):
        self._portal = portal
        self._target = target
        # False once the owner closed the portal: nothing more runs on its loop.
        self._open = is_open

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        attr = getattr(self._target, name)
        if callable(attr):
            return self._method(attr)
        return self._wrap(attr)

    def __dir__(self) -> list[str]:
        return sorted(set(object.__dir__(self)) | {n for n in dir(self._target) if not n.startswith("_")})

    def _method(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def run(*args: Any, **kwargs: Any) -> Any:
            # Sync methods run on the loop too: they may build loop-bound objects.
            return self._wrap(self._portal.call(functools.partial(fn, *args, **kwargs)))

        return run

    def _wrap(self, value: Any) -> Any:
        if isinstance(value, AsyncIterator):
            return self._iterate(value)
        if _has_async_methods(value):
            return Blocking(self._portal, value, self._open)
        return value

    def _iterate(self, agen: AsyncIterator[Any]) -> Iterator[Any]:
        try:
            while True:
                try:
                    yield self._portal.call(agen.__anext__)
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and self._open():
                self._portal.call(aclose)


def _has_async_methods(value: Any) -> bool:
    if isinstance(value, (type, str, bytes, int, float, bool, list, tuple, dict)) or value is None:
        return False
    return any(inspect.iscoroutinefunction(getattr(type(value), n, None))
               for n in dir(type(value)) if not n.startswith("_"))


__all__ = ["Blocking"]
