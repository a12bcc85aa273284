"""Opening the job store: one engine, short transactions, safe for several processes.

SQLite (the default) is shared by the server, its worker thread and the training child
processes, so every transaction starts with ``BEGIN IMMEDIATE``: a writer waits for the lock
(busy_timeout) instead of failing halfway when a read transaction tries to become a write
one. WAL lets readers go on while a child writes its events. PostgreSQL needs none of this.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event
from sqlalchemy.engine import Engine
from sqlalchemy.orm import Session, sessionmaker

from tunesmith.errors import ServiceError
from tunesmith.service.tables import Base


class Store:
    """The database of one service: ``with store.begin() as s:`` is one transaction.

    Never open a transaction inside another on SQLite: the inner ``BEGIN IMMEDIATE`` would
    wait for the outer one's lock.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = _engine(url)
        Base.metadata.create_all(self.engine)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def is_sqlite(self) -> bool:
        return self.engine.dialect.name == "sqlite"

    @contextmanager
    def begin(self) -> Iterator[Session]:
        with self._sessions.begin() as session:
            yield session

    def close(self) -> None:
        self.engine.dispose()


def _engine(url: str) -> Engine:
    if not url.startswith("sqlite"):
        try:
            return create_engine(url, pool_pre_ping=True)
        except Exception as err:  # a missing driver, a malformed URL
            raise ServiceError(f"cannot open the database {url!r}: {err}; for PostgreSQL "
                               "install a driver (pip install psycopg) and use "
                               "postgresql+psycopg://user:pass@host/db", status=500) from err
    path = url.split(":///", 1)[-1]
    if path and path != ":memory:":
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        dbapi_conn.isolation_level = None  # the driver's own BEGIN is replaced by ours below
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA busy_timeout=60000")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine
