"""The fedllm router: authenticated, budgeted, load-balanced front door to hospital nodes.

``create_router_app(load_router_config(path))`` builds the FastAPI app; ``serve_router`` runs
it with uvicorn (TLS unless the config says ``insecure: true``).
"""

from fedllm.serving.router.app import create_router_app
from fedllm.serving.router.config import RouterConfig, load_router_config
from fedllm.serving.router.server import serve_router

__all__ = ["RouterConfig", "create_router_app", "load_router_config", "serve_router"]
