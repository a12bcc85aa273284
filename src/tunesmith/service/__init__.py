"""The service: tunesmith's pipeline behind OpenAI's fine-tuning and chat APIs.

Python entry points (the CLI commands call these):

- ``create_app(settings)``: the FastAPI application; ``serve(settings, host=, port=)`` runs it.
- ``run_worker(settings)``: a standalone worker (more training capacity, other machines).
- ``create_key(store, org)``, ``list_keys``, ``revoke_key``: API keys.
- ``export_feedback(database_url, org=, out_dir=)``: corrections and ratings as the next
  round's chat and DPO data.
- ``improve_model(settings, org, model_id)``: a gated feedback round from a fine-tuned model
  on its users' feedback; a promoted model becomes a new ``ft:`` model.
"""

from tunesmith.service.app import create_app
from tunesmith.service.audit import FeedbackExport, export_feedback, redact
from tunesmith.service.auth import create_key, list_keys, revoke_key
from tunesmith.service.rounds import ServiceRound, improve_model
from tunesmith.service.serve import run_worker, serve
from tunesmith.service.settings import ServiceSettings, default_data_dir, sqlite_url, store_url
from tunesmith.service.store import Store

__all__ = ["FeedbackExport", "ServiceRound", "ServiceSettings", "Store", "create_app",
           "create_key", "default_data_dir", "export_feedback", "improve_model", "list_keys",
           "redact", "revoke_key", "run_worker", "serve", "sqlite_url", "store_url"]
