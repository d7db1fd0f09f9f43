"""OpenAI-compatible HTTP serving over the inference engine."""

from dsv3.serving.app import ServerState, create_app
from dsv3.serving.async_engine import AsyncEngine
from dsv3.serving.server import build_server, load_state

__all__ = ["AsyncEngine", "ServerState", "build_server", "create_app", "load_state"]
