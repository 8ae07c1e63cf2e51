"""Tables for the live tests: big ones with dead rows for VACUUM and autovacuum to work through."""

from __future__ import annotations

from tests.support.servers import Server


def big_table(pg: Server, db: str, name: str = "big", autovacuum: bool = False) -> int:
    """A table of about a thousand pages with half its rows deleted; returns its pages.

    With ``autovacuum`` autovacuum crawls through it (its own cost settings: other tables go at normal speed).
    """
    options = ("autovacuum_vacuum_cost_delay = 100, autovacuum_vacuum_cost_limit = 1" if autovacuum
               else "autovacuum_enabled = false")
    pg.execute(f"CREATE TABLE {name} (id int, pad text) WITH ({options}); "
               f"INSERT INTO {name} SELECT g, repeat('x', 100) FROM generate_series(1, 60000) g; "
               f"DELETE FROM {name} WHERE id % 2 = 0", db)
    return int(pg.execute(f"SELECT pg_relation_size('{name}') / 8192 AS pages", db)[0]["pages"])
