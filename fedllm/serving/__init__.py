"""Serving: the hospital inference server (`node/`), the router (`router/`), and the HTTP API
contract they share (`schemas.py`, `http_limits.py`); neither side imports the other."""
