"""What learning the transaction id at BEGIN costs the client, at the driver itself.

Advisory mode on Postgres sends BEGIN, the key's lock and ``txid_current()`` in one
simple-query message and reads the id back as COPY data (see
``writeturn.dialects._OneMessageBegin``). This times, on one asyncpg connection
without SQLAlchemy or writeturn, the client CPU of a one-insert transaction begun
four ways, alternating in rounds:

- ``plain``: ``BEGIN`` alone (what a write under an ``asyncio.Lock`` sends);
- ``lock``: ``BEGIN; SELECT pg_advisory_xact_lock(..)`` in one message, no id;
- ``copy``: the same with ``COPY (SELECT txid_current()) TO STDOUT`` (writeturn's);
- ``notice``: the lock and the id through a session's temporary plpgsql function
  that raises a NOTICE, read by a log listener (an alternative writeturn does not use:
  it needs a function per server session, which a transaction pooler does not keep,
  and NOTICEs, which ``client_min_messages`` can turn off).

    python benchmarks/driver_begin_cost.py --url postgresql://postgres@127.0.0.1:5432/bench
"""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Awaitable, Callable

import asyncpg
from cpu_over_lock import alternate  # this script's folder is on the path when it runs

LOCK = 42


async def main(url: str, rounds: int, writes: int) -> None:
    c = await asyncpg.connect(url)
    await c.execute("DROP TABLE IF EXISTS writeturn_begin_cost")
    await c.execute("CREATE TABLE writeturn_begin_cost (v int)")
    await c.execute(
        "CREATE FUNCTION pg_temp.tell(bigint) RETURNS void LANGUAGE plpgsql AS "
        "$$BEGIN PERFORM pg_advisory_xact_lock($1); RAISE NOTICE 'xid %', txid_current(); END$$"
    )
    told: list[str] = []
    c.add_log_listener(lambda _con, message: told.append(message.message))
    insert = "INSERT INTO writeturn_begin_cost (v) VALUES ($1)"
    chunks: list[bytes] = []

    async def sink(data: bytes) -> None:
        chunks.append(bytes(data))

    async def plain(i: int) -> None:
        await c.execute("BEGIN")
        await c.execute(insert, i)
        await c.execute("COMMIT")

    async def lock(i: int) -> None:
        await c.execute(f"BEGIN; SELECT pg_advisory_xact_lock({LOCK})")
        await c.execute(insert, i)
        await c.execute("COMMIT")

    async def copy(i: int) -> None:
        chunks.clear()
        query = (
            f"BEGIN; SELECT pg_advisory_xact_lock({LOCK}); COPY (SELECT txid_current()) TO STDOUT"
        )
        await c._protocol.copy_out(query, sink, None)
        int(b"".join(chunks))
        await c.execute(insert, i)
        await c.execute("COMMIT")

    async def notice(i: int) -> None:
        told.clear()
        await c.execute(f"BEGIN; SELECT pg_temp.tell({LOCK})")
        int(told[-1].split()[-1])
        await c.execute(insert, i)
        await c.execute("COMMIT")

    modes: dict[str, Callable[[int], Awaitable[None]]] = {
        "plain": plain,
        "lock": lock,
        "copy": copy,
        "notice": notice,
    }
    try:
        median = await alternate(modes, rounds, writes, warm_up=200)
    finally:
        await c.execute("DROP TABLE IF EXISTS writeturn_begin_cost")
        await c.close()
    print(
        f"client CPU per one-insert transaction (median of {rounds} rounds of {writes}): "
        + ", ".join(
            f"{name} {us:.0f} us ({us - median['plain']:+.0f})" for name, us in median.items()
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--writes", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(main(args.url, args.rounds, args.writes))
