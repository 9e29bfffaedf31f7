"""An OpenAI-compatible HTTP server for a checkpoint, on the continuous-batching engine.

    python -m pdpo_jax.serve --checkpoint runs/x/dpo/best --served-model-name dpo

    server = ModelServer.load("runs/x/dpo/best", name="dpo")   # or ModelServer(engine, tok, ...)
    with pdpo_jax.asgi.running(create_app(server)) as url:     # tests: a free loopback port
        openai.OpenAI(base_url=url + "/v1", api_key="x").chat.completions.create(...)

See docs/serving.md for the endpoints, the parameters and what is not supported.
"""
from pdpo_jax.serve.app import create_app
from pdpo_jax.serve.server import Generation, ModelServer, Sampling

__all__ = ["Generation", "ModelServer", "Sampling", "create_app"]
