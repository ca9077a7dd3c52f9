"""The web process: the Starlette app that mounts every capability's routes, its lifespan
and the one place errors become responses (`app`), the fast path for the hot and long-lived
routes (`fastpath`), health and metrics (`health`), the schema (`openapi`) and the dashboard."""
