"""Shared fixtures: a tiny embedded configuration, and Prefect isolated in a temp folder."""

from __future__ import annotations

import os
import tempfile

_PREFECT_HOME = tempfile.mkdtemp(prefix="ua-prefect-")
os.environ.update(
    {
        "PREFECT_HOME": _PREFECT_HOME,
        "PREFECT_RESULTS_LOCAL_STORAGE_PATH": os.path.join(_PREFECT_HOME, "results"),
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "UNLEARNING_AUDIT_THREADS": "1",
        "UNLEARNING_AUDIT_GPU_RETRY_DELAY": "0",
    }
)

import pytest  # noqa: E402

from unlearning_audit.config import EmbeddedConfig  # noqa: E402

TINY = EmbeddedConfig(
    authors=30,
    functions=10,
    operands=10,
    hidden_size=64,
    intermediate_size=176,
    layers=2,
    batch_size=32,
    lr=3e-3,
    warmup=20,
)


@pytest.fixture(scope="session")
def tiny() -> EmbeddedConfig:
    """An embedded config that pretrains in seconds (2 blocks, hidden 64, 250 facts)."""
    return TINY


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API (SQLite in a temp PREFECT_HOME) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def tiny_model(tiny):
    """The tiny embedded model, pretrained once per session to the targets on its forget set.

    Returns (model, tokenizer, facts, forget groups); tests copy the model before changing it.
    """
    from unlearning_audit import corpus, embedded, runtime

    runtime.setup(tiny.seed, "cpu")
    facts = corpus.generate(
        tiny.seed, {"text": tiny.authors, "code": tiny.functions, "math": tiny.operands}
    )
    forget = set(corpus.forget_groups(facts, "text", tiny.forget_fraction, tiny.seed))
    rows = [{"question": f.question, "answer": f.answer} for f in facts]
    target = [{"question": f.question, "answer": f.answer} for f in facts if f.group in forget]
    tokenizer = embedded.train_tokenizer(facts, tiny.vocab_size)
    model = embedded.build_model(tokenizer, tiny)
    embedded.pretrain(model, tokenizer, rows, target, tiny)
    return model, tokenizer, facts, forget
