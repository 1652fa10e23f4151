"""Every NATS subject and stream name Kneo uses, built in one place."""

from __future__ import annotations

COMMANDS_STREAM = "KNEO_COMMANDS"
EVENTS_STREAM = "KNEO_EVENTS"
OUTPUT_STREAM = "KNEO_OUTPUT"

SERVICES = ("gateway", "compiler", "runner", "human", "audit", "webhooks")


def command(service: str, name: str) -> str:
    """``kneo.cmd.<service>.<name>``: a command for one service."""
    return f"kneo.cmd.{service}.{name}"


def service_commands(service: str) -> str:
    """Every command subject of one service (its durable consumer's filter)."""
    return f"kneo.cmd.{service}.>"


def event(stream_type: str, stream_key: str, event_type: str) -> str:
    """``kneo.evt.<stream_type>.<stream_key>.<event_type>`` for one committed event."""
    return f"kneo.evt.{stream_type}.{stream_key}.{event_type}"


def stream_events(stream_type: str, stream_key: str) -> str:
    """Every event subject of one stream."""
    return f"kneo.evt.{stream_type}.{stream_key}.>"


def all_events() -> str:
    """Every event subject."""
    return "kneo.evt.>"


def run_output(run_id: str) -> str:
    """``kneo.out.<run_id>``: ephemeral token output of a run."""
    return f"kneo.out.{run_id}"


def all_output() -> str:
    """Every output subject."""
    return "kneo.out.>"


def split_stream_id(stream_id: str) -> tuple[str, str]:
    """``run-<id>`` → ``("run", "<id>")``."""
    stream_type, _, key = stream_id.partition("-")
    return stream_type, key


def rpc(service: str, operation: str) -> str:
    """``kneo.rpc.<service>.<operation>``: a request/reply call answered by one copy of a service."""
    return f"kneo.rpc.{service}.{operation}"


def service_rpc(service: str) -> str:
    """Every request/reply subject of one service."""
    return f"kneo.rpc.{service}.>"
