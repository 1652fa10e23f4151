"""The human service."""
