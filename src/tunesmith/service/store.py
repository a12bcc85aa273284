"""Opening the job store: one engine, short transactions, safe for several processes.

SQLite (the default) is shared by the server, its worker thread and the training child
processes, so every transaction starts with ``BEGIN IMMEDIATE``: a writer waits for the lock
(busy_timeout) instead of failing halfway when a read transaction tries to become a write
one. WAL lets readers go on while a child writes its events. PostgreSQL needs none of this.

A store made by an older tunesmith lacks the columns added since; opening it adds them
(``add_new_columns``), so no migration tool is needed for nullable additions.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
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
        add_new_columns(self.engine)
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


def add_new_columns(engine: Engine) -> None:
    """``ALTER TABLE ... ADD COLUMN`` for each nullable column a table of this store lacks.

    One transaction: on SQLite it holds the write lock (``BEGIN IMMEDIATE``), so processes
    opening the store at once add a column once; PostgreSQL gets ``IF NOT EXISTS``.
    """
    with engine.begin() as conn:
        found = inspect(conn)
        quote = conn.dialect.identifier_preparer.quote
        only_new = "" if conn.dialect.name == "sqlite" else "IF NOT EXISTS "
        for table in Base.metadata.sorted_tables:
            present = {c["name"] for c in found.get_columns(table.name)}
            for column in table.columns:
                if column.name in present:
                    continue
                if not column.nullable:
                    raise ServiceError(f"the store's table {table.name} has no column "
                                       f"{column.name}, and it cannot be added to existing "
                                       "rows (not nullable)", status=500)
                conn.exec_driver_sql(
                    f"ALTER TABLE {quote(table.name)} ADD COLUMN {only_new}"
                    f"{quote(column.name)} {column.type.compile(dialect=conn.dialect)}")


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
