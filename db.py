"""Database access: one async engine per process, one session per request."""

import asyncio
from collections.abc import AsyncIterator
from typing import Annotated, Any

import aiomysql
from fastapi import Depends
from pymysql.constants import CR, SERVER_STATUS
from pymysql.err import OperationalError
from sqlalchemy import event
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolResetState
from sqlmodel.ext.asyncio.session import AsyncSession

from settings import Settings, settings


class BoundedConnection(aiomysql.Connection):  # type: ignore[misc]  # aiomysql is untyped
    """An aiomysql connection that waits at most `read_timeout` for each reply from the server.

    PyMySQL has `read_timeout`; aiomysql has none, so a server (or a proxy in front of it) that
    accepts a connection and then goes silent would hold a request for as long as TCP allows.
    Every reply after the handshake is read by one of the two methods below (a query's result,
    or the OK of a ping, commit or rollback), so bounding them bounds each round trip at one
    timer per reply rather than one per packet. Giving up closes the connection and raises the
    error PyMySQL raises for a lost server, which SQLAlchemy reads as a disconnect and answers
    by discarding the connection.
    """

    def __init__(self, *args: Any, read_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.read_timeout = read_timeout

    async def _read_query_result(self, unbuffered: bool = False) -> int:
        try:
            async with asyncio.timeout(self.read_timeout):
                rows: int = await super()._read_query_result(unbuffered=unbuffered)
        except TimeoutError:
            raise self._lost() from None
        return rows

    async def _read_ok_packet(self) -> Any:
        try:
            async with asyncio.timeout(self.read_timeout):
                return await super()._read_ok_packet()
        except TimeoutError:
            raise self._lost() from None

    @property
    def in_transaction(self) -> bool:
        """What the server said in its last reply: is a transaction open on this connection?"""
        return bool(self.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS)

    def _lost(self) -> OperationalError:
        self.close()
        message = f"Lost connection to MySQL server: no reply within {self.read_timeout:g} s"
        return OperationalError(CR.CR_SERVER_LOST, message)


def bounded_connector(config: Settings) -> Any:
    """The connect function SQLAlchemy calls: a `BoundedConnection`, its handshake included in
    the connect timeout."""

    async def connect(**kwargs: Any) -> BoundedConnection:
        connection = BoundedConnection(read_timeout=config.db_read_timeout, **kwargs)
        try:
            async with asyncio.timeout(config.db_connect_timeout):
                await connection._connect()
        except TimeoutError:
            connection.close()
            limit = config.db_connect_timeout
            message = f"Can't connect to MySQL server: no handshake within {limit:g} s"
            raise OperationalError(CR.CR_CONN_HOST_ERROR, message) from None
        return connection

    return connect


def make_engine(config: Settings) -> AsyncEngine:
    """Fail fast when the server is gone: bounded connect and reads, pre-ping, bounded pool wait.
    Every connection's session time zone is UTC, whatever the server's."""
    return create_async_engine(
        config.database_url(),
        pool_pre_ping=True,
        pool_size=config.db_pool_size,
        max_overflow=0,
        pool_timeout=config.db_pool_timeout,
        pool_recycle=3600,
        pool_reset_on_return=None,  # see roll_back_if_open below
        connect_args={
            "async_creator_fn": bounded_connector(config),
            "connect_timeout": config.db_connect_timeout,
            "charset": "utf8mb4",
            "init_command": "SET time_zone = '+00:00'",
        },
    )


engine = make_engine(settings)


@event.listens_for(engine.sync_engine.pool, "reset")
def roll_back_if_open(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
    """Return connections to the pool without an open transaction, in one round trip at most.

    Every request ends its session's transaction itself (COMMIT, or ROLLBACK on close), and the
    pool's own unconditional rollback-on-return would then cost each request a second round
    trip. This one rolls back only when the server reports a transaction still open: a
    connection can never go back to the pool holding another request's locks.
    """
    if state.asyncio_safe and dbapi_connection.driver_connection.in_transaction:
        dbapi_connection.rollback()


async def get_session() -> AsyncIterator[AsyncSession]:
    async with AsyncSession(engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

# What a query raises when the server is down, unreachable, too slow, or the pool is empty.
DATABASE_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
DUPLICATE_KEY = 1062  # MySQL's ER_DUP_ENTRY


def is_duplicate_key(error: sa_exc.IntegrityError) -> bool:
    """Whether an insert failed on a unique key (not on a foreign key or a CHECK)."""
    return getattr(error.orig, "args", (None,))[0] == DUPLICATE_KEY
