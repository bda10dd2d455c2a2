"""The routers, one module per group of endpoints; ``create_app`` includes ``ROUTERS``.

``health`` (/health, /ready, /metrics: no key), ``models`` (/v1/models, and /v1/prompts with
the admin key), ``scoring`` (/v1/score, /v1/classify), ``completions`` (/v1/completions; the
per-request work is in ``softprompt/server/completion.py``), ``chat`` (/v1/chat/completions;
``softprompt/server/chat.py``), ``tokens`` (vLLM's /tokenize and /detokenize). Each handler
reads the shared ``ServerState`` through ``deps.server_state``.
"""

from . import chat, completions, health, models, scoring, tokens

ROUTERS = [health.router, models.router, scoring.router, completions.router, chat.router,
           tokens.router]
