"""How a CLI command reaches a service: the shared ``--service-url`` / ``--profile`` options, one resolver
(:func:`connection`, the precedence of :mod:`kneo_client.profiles`), and one place (:func:`with_client`) that turns
client failures into one line on stderr and the CLI's exit code (1 failed, 2 usage, 3 auth, 4 not found,
5 unreachable)."""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Awaitable, Callable, Iterator
from typing import Annotated, Any, NoReturn

import typer

from kneo_client.errors import ServiceError
from kneo_client.profiles import (
    DEFAULT_SERVICE_URL,
    Connection,
    ProfileError,
    ProfileStore,
    env_key,
    resolve_connection,
)

EXIT_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNREACHABLE = 1, 2, 3, 4, 5

ServiceUrl = Annotated[str | None, typer.Option("--service-url", help="Kneo service URL.")]
Profile = Annotated[str | None, typer.Option("--profile", help="Service profile name")]


_SPINNING: contextvars.ContextVar[Any] = contextvars.ContextVar("kneo_spinner", default=None)


def fail(message: str, code: int) -> NoReturn:
    """Print ``kneo: message`` on stderr (after stopping a running spinner) and exit with ``code``."""
    status = _SPINNING.get()
    if status is not None:
        status.stop()
    typer.echo(f"kneo: {message}", err=True)
    raise typer.Exit(code)


def store() -> ProfileStore:
    """The profile store of this process (``KNEO_SERV_PROFILES_PATH``)."""
    return ProfileStore.from_env(os.environ)


def connection(
    service_url: str | None, profile: str | None, *, default: str | None = DEFAULT_SERVICE_URL
) -> Connection:
    """The service and key for a command's ``--service-url`` / ``--profile`` (``url`` None: run in-process)."""
    from kneo_client.spec_cli import project_config

    project, _ = project_config()
    try:
        return resolve_connection(
            service_url,
            profile,
            environ=os.environ,
            store=store(),
            project_url=project.service.default_url if project else None,
            default=default,
        )
    except ProfileError as exc:
        fail(str(exc), EXIT_USAGE)


def exit_for(exc: ServiceError) -> int:
    """The CLI exit code for a service error."""
    return {401: EXIT_AUTH, 403: EXIT_AUTH, 404: EXIT_NOT_FOUND}.get(exc.status, EXIT_FAILED)


def describe(exc: ServiceError, conn: Connection) -> str:
    """The error line; for 401/403 it also says which key was sent and where it was read from."""
    body = exc.body if isinstance(exc.body, dict) else {}
    if exc.status == 403 and body.get("required_reviewer"):  # the key is fine; the task names its reviewers
        return f"{exc} (this task accepts decisions only from: {', '.join(body['required_reviewer'])})"
    if exc.status in (401, 403):
        return f"{exc} ({conn.auth_hint(exc.status)})"
    return str(exc)


def as_connection(target: Connection | str) -> Connection:
    """A bare URL means ``--service-url`` with the key from the environment."""
    if isinstance(target, Connection):
        return target
    key, source = env_key(os.environ)
    return Connection(target, "--service-url", key, source)


async def with_client(target: Connection | str, call: Callable[[Any], Awaitable[Any]]) -> Any:
    """Run ``call(client)`` with an :class:`AsyncServiceClient` for ``target``; failures end the command."""
    import httpx
    from pydantic import ValidationError

    from kneo_client.sdk import AsyncServiceClient

    conn = as_connection(target)
    assert conn.url is not None
    try:
        client = AsyncServiceClient(conn.url, conn.api_key)
    except ValidationError as exc:
        problem = exc.errors()[0]
        name = str(problem["loc"][0]) if problem["loc"] else "?"
        var = name if name.isupper() else f"KNEO_SERV_CLIENT_{name.upper()}"
        fail(f"invalid {var}: {problem['msg']}", EXIT_USAGE)
    async with client:
        try:
            return await call(client)
        except httpx.TransportError:
            fail(f"no service answers at {conn.url}; start one with `kneo service serve`", EXIT_UNREACHABLE)
        except ServiceError as exc:
            fail(describe(exc, conn), exit_for(exc))


def on_terminal() -> bool:
    """Whether stdout and stderr are both a terminal (colour, tables with borders, spinners); piped output is plain."""
    import sys

    return sys.stdout.isatty() and sys.stderr.isatty()


@contextlib.contextmanager
def spinner(message: str, *, quiet: bool = False) -> Iterator[None]:
    """A spinner on stderr while the command waits (rich status) — only on a terminal, never with ``--json``
    (``quiet``) or when the output is piped, so scripts see exactly the same bytes with or without it."""
    if quiet or not on_terminal():
        yield
        return
    from rich.console import Console

    with Console(stderr=True).status(message) as status:
        token = _SPINNING.set(status)
        try:
            yield
        finally:
            _SPINNING.reset(token)


def table(*columns: str) -> Any:
    """A rich table: boxed on a terminal, plain columns when piped (easy to ``grep``/``awk``)."""
    from rich.table import Table

    if on_terminal():
        return Table(*columns)
    return Table(*columns, box=None, show_edge=False, pad_edge=False)


def call(service_url: str | None, profile: str | None, fn: str, *args: Any, **kwargs: Any) -> Any:
    """Run one SDK method (``AsyncServiceClient.<fn>``) against the service of ``--service-url`` / ``--profile``."""
    import asyncio

    return asyncio.run(with_client(connection(service_url, profile), lambda c: getattr(c, fn)(*args, **kwargs)))
