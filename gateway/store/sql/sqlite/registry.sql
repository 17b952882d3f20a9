-- Registry snapshots applied by this gateway (gateway.registry.holder): the highest version ever accepted is the
-- floor below which no snapshot is taken again, and the signed text of each one applied lets every node of a
-- gateway sharing this database take up a snapshot another node applied.
CREATE TABLE IF NOT EXISTS registry_applied (
    version    INTEGER NOT NULL,
    digest     TEXT NOT NULL,
    applied_at TEXT NOT NULL,
    snapshot   BLOB,               -- the signed snapshot exactly as applied (none in rows of earlier releases)
    PRIMARY KEY (version, digest)
);
