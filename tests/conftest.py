import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_llama  # noqa: E402


@pytest.fixture(autouse=True)
def own_cache(tmp_path_factory, monkeypatch) -> Path:
    """$LORADEM_CACHE of the test's own (fingerprints.json, bases): the user's cache is never read or written, and
    the embedded base is never there to need. A test that sets LORADEM_CACHE itself overrides this one."""
    cache = tmp_path_factory.mktemp("loradem-cache", numbered=True)
    monkeypatch.setenv("LORADEM_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory) -> Path:
    """A tiny random Llama folder (untied embeddings) with a real BPE tokenizer and chat template."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_base_tied(tmp_path_factory) -> Path:
    """The same, with tied input/output embeddings (like SmolLM2)."""
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-tied") / "base", seed=1, tie_word_embeddings=True)
