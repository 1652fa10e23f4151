"""Route groups; each is defined once and mounted under ``/v1`` and as its unversioned legacy alias."""
