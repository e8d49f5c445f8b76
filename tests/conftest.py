"""Shared pytest fixtures. Keep them grouped by section; put helpers in their own module
(brokers in tests/brokers.py) and only the fixtures here."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.brokers import Broker, Clients, mosquitto_missing, prod_missing, start_broker

# --------------------------------------------------------------------------- general


def pytest_configure(config: pytest.Config) -> None:
    # Tiny models spend their time in per-op overhead: one torch thread is several times faster
    # than two fighting over 2 cores with the broker and worker processes.
    import torch

    torch.set_num_threads(1)


@pytest.fixture
def uid() -> str:
    """A short id unique to this test, for topic segments, session ids and client ids."""
    return f"t{uuid.uuid4().hex[:10]}"


# --------------------------------------------------------------------------- MQTT brokers
# Every broker is a real mosquitto on a free port of 127.0.0.1, started from broker/*.conf.
# Tests that need one are marked `broker` automatically (by using these fixtures).


def _broker(kind: str, workdir: Path) -> Iterator[Broker]:
    reason = prod_missing() if kind == "prod" else mosquitto_missing()
    if reason:
        pytest.skip(reason)
    broker = start_broker(kind, workdir)
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def dev_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The dev config (anonymous, plain MQTT), shared by the whole run: never stop or restart it."""
    yield from _broker("dev", tmp_path_factory.mktemp("dev-broker"))


@pytest.fixture
def own_dev_broker(tmp_path: Path) -> Iterator[Broker]:
    """A dev broker of this test alone: it may ``restart()`` or ``stop(crash=True)`` it."""
    yield from _broker("dev", tmp_path / "broker")


@pytest.fixture(scope="session")
def prod_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """The prod config (TLS, passwords, ACL), shared by the run. ``users``: devA, devB (devices),
    worker1, worker2 (workers), monitor (read-only operator) with their passwords; ``ca_file``;
    ``config(username)``."""
    yield from _broker("prod", tmp_path_factory.mktemp("prod-broker"))


@pytest.fixture(scope="module")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A tiny random Qwen2 draft (one layer) and target of the same tokenizer: (draft, target)."""
    from tests.tiny import make_tiny_model_dir

    root = tmp_path_factory.mktemp("tiny-pair")
    draft = make_tiny_model_dir(root / "draft", arch="qwen2", seed=1, layers=1)
    target = make_tiny_model_dir(root / "target", arch="qwen2", seed=2)
    return draft, target


@pytest.fixture
def mqtt_clients() -> Iterator[Clients]:
    """``mqtt_clients.make(config, client_id=None, connect=True, **make_client_kwargs)``; all
    closed at teardown."""
    clients = Clients()
    try:
        yield clients
    finally:
        clients.close_all()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark tests that use a broker fixture with ``broker`` (``-m "not broker"`` skips them)."""
    broker_fixtures = {"dev_broker", "own_dev_broker", "prod_broker"}
    for item in items:
        if broker_fixtures & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.broker)
