"""Test environment: offline, one torch thread, private config/cache dirs, real services.

Every fixture that starts a process stops it (by PID) when it is done.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_TMP = Path(tempfile.mkdtemp(prefix="duet-tests-"))
os.environ.update({
    "HF_HUB_OFFLINE": "1",
    "OMP_NUM_THREADS": "1",
    "DUET_TORCH_THREADS": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "DUET_CONFIG_DIR": str(_TMP / "config"),
    "DUET_CACHE_DIR": os.environ.get("DUET_TEST_CACHE_DIR", str(_TMP / "cache")),
    "DUET_HOST_NAME": "test-host",
})
for var in ("DUET_POSTGRES_URL", "DUET_MONGO_URL", "DUET_WORKSPACE"):
    os.environ.pop(var, None)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def stores(tmp_path_factory):
    """Real embedded PostgreSQL and Mongo-wire servers for the session."""
    from infra import services

    sd = tmp_path_factory.mktemp("stores") / ".duet"
    sd.mkdir()
    pg = services.start_postgres(sd)
    mongo = services.start_mongo(sd)
    yield {"state_dir": sd, "postgres": pg, "mongo": mongo}
    services.stop_postgres(sd)
    services.stop_mongo(sd)


@pytest.fixture
def fresh_db(stores):
    """Clean databases for one test: a new Postgres database and a new Mongo db name."""
    import uuid

    import psycopg

    name = "t" + uuid.uuid4().hex[:12]
    with psycopg.connect(stores["postgres"].url, autocommit=True) as c:
        c.execute(f"CREATE DATABASE {name}")
    pg_url = stores["postgres"].url.rsplit("/", 1)[0] + "/" + name
    yield {"postgres_url": pg_url, "mongo_url": f"{stores['mongo'].url.rstrip('/')}/{name}", "mongo_db": name}


def architect_and_executor(tmp: Path) -> tuple:
    """A plain Architect (no stores) with the persona dataset curated, and a plain Executor (no
    exporter): the engine without Ray."""
    from roles.architect import Architect
    from training.run.executor import Executor

    arch = Architect(str(tmp / "ws"), None, None, session_title=tmp.name)
    ds = arch.curate([str(REPO / "examples/persona/persona.jsonl")], "persona")
    return arch, Executor(tmp / "data", metrics_port=None), ds


@pytest.fixture(scope="session")
def engine_env():
    """The factory above, for module-scoped fixtures: ``engine_env(tmp_dir)``."""
    return architect_and_executor
