"""The kneo CLI and the Python client SDK."""
