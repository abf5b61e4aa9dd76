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
        "UNLEARNING_AUDIT_GPU_RETRY_DELAY": "0",
    }
)

# One torch thread unless the run asks for more (UNLEARNING_AUDIT_THREADS=2 stands in for another
# machine's float paths: no test may depend on which).
os.environ.setdefault("UNLEARNING_AUDIT_THREADS", "1")

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


LONGEST_FIRST = ("test_calibration.py", "test_study.py")
"""Modules that take longest (minutes of training each), collected first: under xdist
(`make test`: two workers, whole modules each) they start at once and run beside the rest,
instead of after it."""


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order kept


@pytest.fixture(scope="session")
def tiny() -> EmbeddedConfig:
    """An embedded config that pretrains in seconds (2 blocks, hidden 64, 250 facts)."""
    return TINY


@pytest.fixture(scope="session")
def small_audit(tiny):
    """The smallest audit with every kind of stage: one method, relearning on the forget set,
    Fisher; no control model, probes or quantization. Tests set its store and name."""
    from unlearning_audit.config import AuditParams, RelearnConfig, UnlearnConfig

    return AuditParams(
        embedded=tiny,
        methods=[UnlearnConfig(method="GA", lr=1e-3, steps=10)],
        relearn=RelearnConfig(sources=["forget"], seeds=1),
        no_control=True,
        probes=False,
        quantization_bits=[],
    )


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's per-sample gradients: two oversubscribe a 2-core machine
    (about 60x slower here); restored afterwards."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_files(tmp_path_factory) -> dict[str, str]:
    """Valid forget and retain sets (two and one rows), for tests where something else is the
    problem."""
    import json

    folder = tmp_path_factory.mktemp("data")
    files = {}
    for name, rows in {
        "forget": [{"question": f"Who wrote Q{i}?", "answer": "A"} for i in range(2)],
        "retain": [{"question": "Who wrote R?", "answer": "B"}],
    }.items():
        files[name] = str(folder / f"{name}.json")
        (folder / f"{name}.json").write_text(json.dumps(rows))
    return files


@pytest.fixture(scope="session")
def prefect_server():
    """One temporary Prefect API (SQLite in a temp PREFECT_HOME) for the whole session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def audit_params(tiny, tmp_path_factory):
    """The smallest embedded audit (one unlearning method) into a store of its own; test_flow and
    test_lean_store run it once (first_run) and read or extend that store."""
    from unlearning_audit.config import AuditParams, UnlearnConfig

    return AuditParams(
        embedded=tiny,
        store=str(tmp_path_factory.mktemp("store")),
        methods=[UnlearnConfig(method="GA", lr=1e-3, steps=10)],
    )


@pytest.fixture(scope="session")
def first_run(prefect_server, audit_params):
    """The first run of audit_params: its final state, and its wall time in seconds."""
    import time

    from flows.audit import audit_checkpoint

    start = time.perf_counter()
    state = audit_checkpoint(audit_params, return_state=True)
    return state, time.perf_counter() - start


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


class S3Server:
    """A moto S3 server on 127.0.0.1 that can stop and restart on its port; its buckets live in
    this process, so they outlast a restart, as a real server's disks would."""

    def __init__(self) -> None:
        self.port = 0
        self.running = False
        self.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        self.port = self._server.get_host_and_port()[1]
        self.running = True

    def stop(self) -> None:
        self._server.stop()
        self.running = False


@pytest.fixture
def s3_server(tmp_path, monkeypatch):
    """A fresh S3Server, with the AWS environment pointing at it: fake credentials, no botocore
    retries (the store's own are what tests exercise), a private cache; stopped afterwards."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = S3Server()
    for name, value in {
        "AWS_ENDPOINT_URL": server.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_MAX_ATTEMPTS": "1",
        "UNLEARNING_AUDIT_CACHE": str(tmp_path / "s3-cache"),
    }.items():
        monkeypatch.setenv(name, value)
    yield server
    if server.running:
        server.stop()
