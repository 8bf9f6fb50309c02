"""Database access: one async engine per app (built in its lifespan), a session for each
write, a borrowed connection for each read."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Annotated, Any, TypeVar

import aiomysql
from fastapi import Depends, Request
from pymysql.constants import CR, SERVER_STATUS
from pymysql.err import OperationalError
from sqlalchemy import CursorResult, Executable, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import PoolResetState
from sqlmodel.ext.asyncio.session import AsyncSession

from settings import Settings

T = TypeVar("T")


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
        self.gave_up = False

    async def _read_query_result(self, unbuffered: bool = False) -> int:
        return await self._within_read_timeout(super()._read_query_result(unbuffered=unbuffered))

    async def _read_ok_packet(self) -> Any:
        return await self._within_read_timeout(super()._read_ok_packet())

    async def _within_read_timeout(self, reply: Awaitable[T]) -> T:
        """Await `reply`, closing the connection if the server stays silent past the limit.

        A bare loop timer rather than `asyncio.timeout`: this runs for every reply, and the
        timer costs a fraction of a task-cancelling scope. Closing the socket ends the pending
        read with PyMySQL's "lost connection" error, given here the reason it was lost.
        """
        timer = self._loop.call_later(self.read_timeout, self._give_up)
        try:
            return await reply
        except Exception:
            # Closing the socket under a half-read reply can surface as anything aiomysql
            # raises from a closed reader (an AttributeError on its None stream, say).
            if self.gave_up:
                raise self._lost() from None
            raise
        finally:
            timer.cancel()

    def _give_up(self) -> None:
        self.gave_up = True
        if self._writer is not None:
            self._writer.transport.abort()  # nothing waits on a silent server's write buffer
        self.close()

    @property
    def in_transaction(self) -> bool:
        """What the server said in its last reply: is a transaction open on this connection?"""
        return bool(self.server_status & SERVER_STATUS.SERVER_STATUS_IN_TRANS)

    def _lost(self) -> OperationalError:
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


class TransactionConflictError(sa_exc.DatabaseError):
    """The transaction lost to a concurrent one (a deadlock, a lock wait past its limit, or a
    cluster's certification failure): nothing it did was kept, and the server is fine."""


class DatabaseRefusedError(sa_exc.DatabaseError):
    """The server is up and refused the statement (a CHECK constraint, say): retrying the same
    request cannot succeed, so it is a server error, not an outage."""


# The MySQL and MariaDB error codes of an outage: the client's own (2000-2999: refused, lost,
# gone away, no reply in time) and the server's for a connection it will not serve: too many
# connections, shutting down, connection killed, closed for inactivity, a cluster node that
# is not ready for queries.
SERVER_OUTAGE_CODES = frozenset({1040, 1053, 1927, 4031, 1047})
CONFLICT_CODES = frozenset({1205, 1213})  # lock wait timeout; deadlock or certification failure


# How many times a transaction that lost to a concurrent one is run again before the request
# is answered as the lost race it is (409). On one server a loss is rare (a deadlock); on a
# cluster with several writers two commits touching one row on different nodes fail each
# other's certification, and the same transaction run again usually goes through.
CONFLICT_TRIES = 3


async def retry_conflicts(session: AsyncSession, transaction: Callable[[], Awaitable[T]]) -> T:
    """Run `transaction` (a whole transaction on `session`, ended by its commit) and, if it
    loses to a concurrent one, roll back and run it again from the start, `CONFLICT_TRIES`
    times in all. The last loss propagates (`TransactionConflictError`: a 409)."""
    for tries_left in reversed(range(CONFLICT_TRIES)):
        try:
            return await transaction()
        except TransactionConflictError:
            await session.rollback()
            if not tries_left:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


def classify_server_error(context: ExceptionContext) -> BaseException | None:
    """SQLAlchemy's `handle_error` hook. PyMySQL raises `OperationalError` for outages and
    for many refusals alike; only an outage keeps that class (and so stays in
    `DATABASE_UNREACHABLE`: 503 with Retry-After). A conflict becomes
    `TransactionConflictError`, any other refusal `DatabaseRefusedError`."""
    error = context.sqlalchemy_exception
    if not isinstance(error, sa_exc.OperationalError) or context.is_disconnect:
        return None
    code = error_code(context.original_exception)
    if code is None or 2000 <= code < 3000 or code in SERVER_OUTAGE_CODES:
        return None
    kind = TransactionConflictError if code in CONFLICT_CODES else DatabaseRefusedError
    return kind(error.statement, error.params, context.original_exception)


def error_code(error: BaseException | None) -> int | None:
    """The server's (or the client library's) numeric code of a DBAPI error."""
    code = getattr(error, "args", (None,))[0] if error is not None else None
    return code if isinstance(code, int) else None


def make_engine(config: Settings) -> AsyncEngine:
    """Fail fast when the server is gone: bounded connect and reads, pre-ping, bounded pool wait.
    Every connection's session time zone is UTC, whatever the server's. Errors that are not
    an outage are told apart from those that are (`classify_server_error`)."""
    engine = create_async_engine(
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
            "init_command": "SET time_zone = '+00:00', "
            f"innodb_lock_wait_timeout = {config.db_lock_wait_timeout:d}",
        },
    )
    event.listen(engine.sync_engine, "handle_error", classify_server_error, retval=True)
    event.listen(engine.sync_engine.pool, "reset", roll_back_if_open)
    return engine


def roll_back_if_open(dbapi_connection: Any, record: Any, state: PoolResetState) -> None:
    """Return connections to the pool without an open transaction, in one round trip at most.

    Every request ends its transaction itself (a write's COMMIT, or the ROLLBACK when its
    session or a read's connection closes), and the pool's own unconditional
    rollback-on-return would then cost each request a second round trip. This one rolls back
    only when the server reports a transaction still open: a connection can never go back to
    the pool holding another request's locks.
    """
    if state.asyncio_safe and dbapi_connection.driver_connection.in_transaction:
        dbapi_connection.rollback()


async def get_engine(request: Request) -> AsyncEngine:
    """The app's engine, from its lifespan state. A read borrows a pooled connection from it
    for its statements (`async with engine.connect()`) and gives it back: no session, no
    `yield` dependency, no transaction of its own beyond the statements'."""
    engine: AsyncEngine = request.state.engine
    return engine


EngineDep = Annotated[AsyncEngine, Depends(get_engine)]


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """A write's session, on the app's engine."""
    async with AsyncSession(request.state.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(get_session, scope="function")]

# Where a statement runs: a write's session (inside its transaction) or a read's connection.
Database = AsyncSession | AsyncConnection


async def execute_core(
    db: Database, statement: Executable, params: Mapping[str, Any] | None = None
) -> CursorResult[*tuple[Any, ...]]:
    """Run a Core statement (built from the SQLModel tables) on a read's connection, or on a
    write session's connection inside its transaction: the one way the app runs a statement.

    Rows come back as plain columns: the ORM's per-statement bookkeeping costs more than the
    round trip itself and buys these statements nothing.
    """
    connection = db if isinstance(db, AsyncConnection) else await db.connection()
    return await connection.execute(statement, params)


# What a query raises when the server is down, unreachable, too slow, or the pool is empty.
DATABASE_UNREACHABLE = (sa_exc.OperationalError, sa_exc.InterfaceError, sa_exc.TimeoutError)
DUPLICATE_KEY = 1062  # MySQL's ER_DUP_ENTRY


def is_duplicate_key(error: sa_exc.IntegrityError) -> bool:
    """Whether an insert failed on a unique key (not on a foreign key or a CHECK)."""
    return error_code(error.orig) == DUPLICATE_KEY


def duplicate_key_name(error: sa_exc.IntegrityError) -> str | None:
    """The unique key a write collided with, or None for another integrity error. MariaDB
    says `for key 'uq_x'`, MySQL 8 `for key 'table.uq_x'`."""
    if not is_duplicate_key(error):
        return None
    message = str(getattr(error.orig, "args", ("", ""))[-1])
    _, found, key = message.rpartition(" for key ")
    return key.strip("'").rpartition(".")[2] if found else None
