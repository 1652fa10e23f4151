"""The compiler: the spec language (pure, importable) and the service that compiles every new run."""
