"""Test setup: 8 fake CPU devices so sharding is exercised; set before JAX is imported anywhere."""

import os

import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The first CORPUS_CHARS characters of tinyshakespeare (ASCII: bytes == characters)."""
    from tests.data_helpers import CORPUS_CHARS
    from tests.helpers import small_corpus

    path = small_corpus(tmp_path_factory.mktemp("corpus"), num_chars=CORPUS_CHARS)
    with open(path, encoding="utf-8") as f:
        assert f.read().isascii()
    return path


@pytest.fixture(scope="module")
def train_corpus(tmp_path_factory):
    """The first 60,000 characters of tinyshakespeare: enough val rows for tiny train + eval runs."""
    from tests.helpers import small_corpus

    return small_corpus(tmp_path_factory.mktemp("train_corpus"))


@pytest.fixture(scope="module")
def corpus_text(corpus):
    with open(corpus, encoding="utf-8") as f:
        return f.read()


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """No hub access, and HF datasets' cache in tmp."""
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


import tests.toy_family  # noqa: E402,F401 -- registers the test-only `toy` family (contract tests run it too)


def pytest_collection_modifyitems(config, items):
    """`gpu_only` tests run only where jax has a GPU (their CPU counterparts run the kernels in interpret mode)."""
    import jax

    if jax.default_backend() == "gpu":
        return
    skip = pytest.mark.skip(reason="gpu_only: no GPU here (the interpret-mode tests cover these kernels on CPU)")
    for item in items:
        if "gpu_only" in item.keywords:
            item.add_marker(skip)
