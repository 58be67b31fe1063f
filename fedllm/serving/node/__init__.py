"""The hospital inference server (node): its ``node.yaml``, generation backends, HTTP API and
uvicorn server.

- `config`: the ``node.yaml`` schema; `backends`: the backend protocol and `ConstantBackend`;
  `generation`: `ModelBackend` (base model + hot-reloaded DP adapter + optional local adapter).
- `app`: assembles the FastAPI app; `state`: what its endpoints share, as a FastAPI dependency;
  `probes`, `completions`, `ballots`: the endpoint groups (``APIRouter``s).
- `server`: uvicorn with TLS/mTLS, the plain-HTTP probe port, `BackgroundServer`.

It shares only the API contract (`fedllm.serving.schemas`, `fedllm.serving.http_limits`) with
the router; neither imports the other.
"""
