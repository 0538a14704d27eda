"""Serving: an OpenAI-compatible HTTP API over the engine (``sparseek serve``)."""

from sparseek.serve.api import build_app, serve

__all__ = ["build_app", "serve"]
