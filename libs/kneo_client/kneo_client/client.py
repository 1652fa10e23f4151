"""``ServiceClient``: the blocking twin of :class:`~kneo_client.sdk.AsyncServiceClient`.

Every public coroutine method of the async client exists here with the same name, arguments and docstring, and
``stream_run`` is a plain iterator. The methods are generated from the async class, so the two never drift apart and
there is one copy of the HTTP logic (requests, typed errors, retries, idempotency keys). Each client owns a private
event loop on a daemon thread; calls block the caller until their coroutine ends there, which also makes the client
usable from code that already runs an event loop (a notebook, a web handler).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from kneo_client.sdk import DEFAULT_URL, AsyncServiceClient

T = TypeVar("T")


class ServiceClient:
    """Blocking client for the Kneo platform API; see :class:`AsyncServiceClient` for each method.

    >>> with ServiceClient("http://127.0.0.1:8000") as client:
    ...     run = client.create_run(input="hello", spec_path="examples/research_agent.yaml")
    """

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, **options: Any) -> None:
        """Same arguments as :class:`AsyncServiceClient` (``timeout``, ``retries``, ``retry_backoff_seconds``,
        ``idempotency_key``, ``transport``)."""
        self._closed = False
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kneo-service-client", daemon=True)
        self._thread.start()
        try:
            self._async: AsyncServiceClient = self._run(_build(base_url, api_key, options))
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_profile(cls, profile: str | None = None, service_url: str | None = None, **options: Any) -> ServiceClient:
        """A client for the service the CLI would use: ``service_url``, else the named profile, else
        ``KNEO_SERV_URL``, else the active profile, else the default URL (see :mod:`kneo_client.profiles`)."""
        from kneo_client.profiles import ProfileStore, resolve_connection

        conn = resolve_connection(service_url, profile, environ=os.environ, store=ProfileStore.from_env(os.environ))
        assert conn.url is not None
        return cls(conn.url, conn.api_key, **options)

    @property
    def base_url(self) -> str:
        """The service's base URL."""
        return self._async.base_url

    @property
    def async_client(self) -> AsyncServiceClient:
        """The async client underneath (use it only on :attr:`loop`)."""
        return self._async

    def __enter__(self) -> ServiceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections and stop the private event loop (safe to call twice)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._run(self._async.aclose())
            self._run(self._loop.shutdown_asyncgens())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._loop.close()

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._loop.is_closed():
            coro.close()
            raise RuntimeError("this ServiceClient is closed")
        future = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result()
        except BaseException:
            future.cancel()  # Ctrl-C in the caller: stop the request too
            raise

    def _iterate(self, stream: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    item = self._run(_next(stream))
                except StopAsyncIteration:
                    return
                yield item
        finally:
            closer = getattr(stream, "aclose", None)
            if closer is not None and not self._loop.is_closed():
                self._run(closer())

    if TYPE_CHECKING:  # the generated methods below; their signatures are AsyncServiceClient's

        def __getattr__(self, name: str) -> Any: ...


async def _build(base_url: str, api_key: str | None, options: dict[str, Any]) -> AsyncServiceClient:
    return AsyncServiceClient(base_url, api_key, **options)


async def _next(stream: AsyncIterator[T]) -> T:
    return await anext(stream)


def _blocking(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    if inspect.isasyncgenfunction(method):

        @functools.wraps(method)
        def iterate(self: ServiceClient, *args: Any, **kwargs: Any) -> Iterator[Any]:
            return self._iterate(getattr(self._async, name)(*args, **kwargs))

        return iterate

    @functools.wraps(method)
    def call(self: ServiceClient, *args: Any, **kwargs: Any) -> Any:
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return call


def sync_method_names() -> list[str]:
    """The public async methods that :class:`ServiceClient` mirrors."""
    return [
        name
        for name, member in vars(AsyncServiceClient).items()
        if not name.startswith("_")
        and name != "aclose"
        and (inspect.iscoroutinefunction(member) or inspect.isasyncgenfunction(member))
    ]


for _name in sync_method_names():
    setattr(ServiceClient, _name, _blocking(_name, getattr(AsyncServiceClient, _name)))
