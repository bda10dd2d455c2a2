"""``softprompt serve``: an HTTP API over one Runtime (FastAPI + uvicorn, the ``[serve]`` extra).

OpenAI's completions and chat dialects with every soft prompt listed as a model
(``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``; vLLM's
``POST /tokenize`` and ``POST /detokenize``), the native batch calls (``POST /v1/score``,
``POST /v1/classify``), prompt management with the admin key (``POST /v1/prompts``,
``DELETE /v1/prompts/{name}``; JSON segments compose a prompt), inline prompts per request
(``soft_prompt``, ``prompt_embeds``), ``GET /health``, ``GET /ready`` and Prometheus
``GET /metrics``.

    from softprompt import Runtime
    from softprompt.server import create_app, serve
    serve(create_app(Runtime.load("default")), "127.0.0.1", 8000)

Files: ``app.py`` (``create_app``: state, middleware, errors, routers; ``serve`` under
uvicorn), ``state.py`` (``ServerState``: the runtime's loading and readiness, keys, back-pressure,
timeouts), ``routes/`` (one router per group of endpoints), ``completion.py`` (serving
/v1/completions: echo, generation, server-sent events), ``chat.py`` and ``chat_protocol.py``
(/v1/chat/completions on the same machinery, /tokenize bodies), ``inline.py`` (a request's
own prompt: ``soft_prompt`` / vLLM's ``prompt_embeds``, decoded and checked), ``deps.py``
(dependencies: the state, API keys), ``errors.py`` (the one error shape), ``middleware.py``
(body limit, response counts), ``protocol.py`` (request and response bodies), ``metrics.py``
(every metric, named once).
"""

from .app import APIError, create_app, prompt_dir_sources, serve

__all__ = ["create_app", "serve", "prompt_dir_sources", "APIError"]
