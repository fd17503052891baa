"""The HTTP server: the Sanic app and its state, and what every route shares (errors,
authentication, CORS, admission limits, request parsing, SSE, timeouts, metrics, the
OpenAPI document), with the OpenAI-compatible routes (`routes.py`, `generation.py`,
`tokenization.py`); the interactive-session routes (`frontends/interactive`) plug into
the same app."""
