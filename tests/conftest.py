"""Fixtures: real Postgres, real NATS, a real ``keyledger serve`` per test module.

Where the servers come from:
* ``DATABASE_URL`` / ``NATS_URL`` set (CI's second pass, a developer's machine): those servers, with a fresh
  database cloned from a template per module and unique JetStream names per module;
* unset (a fresh machine, CI's first pass): an embedded PostgreSQL and a private nats-server for the run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from harness import Service, delete_streams, unique_topology
from servers import DatabaseFactory, admin_database_url, nats_url as _nats_url

SCHEMA = Path(__file__).resolve().parent.parent / "schema.sql"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    url, cleanup = admin_database_url()
    yield url
    if cleanup:
        cleanup()


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    url, cleanup = _nats_url()
    yield url
    if cleanup:
        cleanup()


@pytest.fixture(scope="session")
def db_factory(pg_admin_url: str) -> Iterator[DatabaseFactory]:
    factory = DatabaseFactory(pg_admin_url, SCHEMA)
    yield factory
    factory.drop_all()


def _hint(request: pytest.FixtureRequest) -> str:
    return request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")


@pytest.fixture(scope="module")
def database_url(db_factory: DatabaseFactory, request: pytest.FixtureRequest) -> str:
    return db_factory.create(_hint(request))


@pytest.fixture(scope="module")
def service(database_url: str, nats_url: str, request: pytest.FixtureRequest) -> Iterator[Service]:
    topology = unique_topology(_hint(request))
    svc = Service(database_url=database_url, nats_url=nats_url, topology=topology).start()
    yield svc
    svc.stop()
    asyncio.run(delete_streams(nats_url, topology))


@pytest.fixture
def db(service: Service) -> Iterator[psycopg.Connection[Any]]:
    with psycopg.connect(service.database_url, autocommit=True) as conn:
        yield conn


@pytest.fixture
def alice(service: Service) -> dict[str, str]:
    return service.session()


@pytest.fixture
def bob(service: Service) -> dict[str, str]:
    return service.session()
