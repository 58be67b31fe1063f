"""Serving: the hospital inference server (node) and the shared HTTP API contract."""
