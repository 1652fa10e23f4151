"""Built-in, offline-capable connectors: tools that read a local mailbox (``gmail``) and calendar
(``google_calendar``). They are ordinary function tools (``kneo_runner.connectors.<module>:<function>``), always
importable by the runner, reading only the path their tool entry binds and grants (``ToolContext`` checks it)."""
