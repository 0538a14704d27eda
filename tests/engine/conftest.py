"""Shared engine fixtures: the debug preset with random weights (every V4 layer type, short window)."""

from __future__ import annotations

import pytest

import sparseek
from sparseek.model import build_model
from sparseek.tokenizer import default_tokenizer
from tests.conftest import randomize_


@pytest.fixture(scope="module")
def model():
    return randomize_(build_model(sparseek.preset("debug")), 21).eval()


@pytest.fixture(scope="module")
def tok():
    return default_tokenizer(512)
