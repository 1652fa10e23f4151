"""Kneo's shared kernel: event and command schemas, subjects, the event store, projections, the bus."""

__version__ = "0.1.0"
