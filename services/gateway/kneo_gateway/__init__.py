"""The gateway: HTTP faces of the platform (FastAPI), SSE fed from the bus, queries from projections."""
