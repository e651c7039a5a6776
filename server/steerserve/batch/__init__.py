"""OpenAI Files + Batches API for steerserve, durable in SQLite, with per-line `steering`.

Layout: `store` (SQLite schema and queries; the database is the source of truth), `lines`
(input parsing, output/error line formats), `files_api` and `batches_api` (FastAPI routers),
`runner` (drives every batch to its next state and runs each line through the server's own
ASGI app, so a line is validated, steered and answered exactly like an interactive request),
`plugin` (wiring into vLLM's app), `offline` (`steerserve run-batch`).
"""

from steerserve.batch.plugin import attach_batch_api, start_batch_service

__all__ = ["attach_batch_api", "start_batch_service"]
