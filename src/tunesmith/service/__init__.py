"""The service: tunesmith's pipeline behind OpenAI's fine-tuning and chat APIs.

Python entry points (the CLI commands call these):

- ``create_app(settings)``: the FastAPI application; ``serve(settings, host=, port=)`` runs it.
- ``run_worker(settings)``: a standalone worker (more training capacity, other machines).
- ``create_key(store, org)``, ``list_keys``, ``revoke_key``: API keys.
- ``export_feedback(database_url, org=, out_dir=)``: corrections and ratings as the next
  round's chat and DPO data.
"""

from tunesmith.service.app import create_app
from tunesmith.service.audit import FeedbackExport, export_feedback, redact
from tunesmith.service.auth import create_key, list_keys, revoke_key
from tunesmith.service.serve import run_worker, serve
from tunesmith.service.settings import ServiceSettings, default_data_dir, sqlite_url, store_url
from tunesmith.service.store import Store

__all__ = ["FeedbackExport", "ServiceSettings", "Store", "create_app", "create_key",
           "default_data_dir", "export_feedback", "list_keys", "redact", "revoke_key",
           "run_worker", "serve", "sqlite_url", "store_url"]
