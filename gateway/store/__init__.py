"""Storage: the one place that knows the database.

Every SQL statement of the gateway lives in this package (``tests/test_store_boundary.py`` keeps it so); the rest
of the code calls the ports defined here, one per aggregate:

- :mod:`.store` — messages and their stages, resources and search (``StorePort``);
- :mod:`.reports` — versions of a report across corrections;
- :mod:`.exchange` — signed Bundles, issued and received; :mod:`.outbox` — deliveries to other members;
- :mod:`.decisions` — recognition decisions, overrides and withdrawals; :mod:`.referrals` — 移送 Tasks;
- :mod:`.registry` — the registry snapshots applied; :mod:`.accounts` — users, tokens, sessions, clients;
- :mod:`.audit` — the hash-chained audit log, its index and checkpoints; :mod:`.views` — what the console,
  ``/metrics`` and ``/health`` read.

Each port has one implementation that speaks both engines: SQLite (the embedded default, :mod:`.db`) and
PostgreSQL (:mod:`.postgresql`), branching on :func:`.db.dialect` only where their SQL differs. The tables of each
part are in ``sql/sqlite/`` and ``sql/postgresql/``; :mod:`.layout` creates and upgrades them all
(``gateway db upgrade``) and records each part's layout version (:mod:`.schema`).
"""
