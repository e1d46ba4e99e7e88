"""`lynx-exit serve`: an OpenAI-compatible server with per-request early exit and continuous batching."""

from lynx_exit.serve.app import create_app, run
from lynx_exit.serve.protocol import APIError, ServerOptions
from lynx_exit.serve.server import Server

__all__ = ["APIError", "Server", "ServerOptions", "create_app", "run"]
