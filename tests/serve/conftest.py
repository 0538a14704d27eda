"""The server is tested on the engine's debug model and tokenizer."""

from tests.engine.conftest import model, tok

__all__ = ["model", "tok"]  # pytest finds fixtures by name in this module
