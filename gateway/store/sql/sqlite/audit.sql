-- Audit log schema (SQLite): append-only, hash-chained (see gateway/audit/log.py for the hash).
-- Every statement is idempotent; gateway.store.audit.AuditStore.ensure_schema runs them in one transaction.

-- One row per event. `content` is the RFC 8785 (JCS) text that the hash covers;
-- the search columns are GENERATED from it, so they can never disagree with it.
CREATE TABLE IF NOT EXISTS audit_log (
    seq            INTEGER PRIMARY KEY,      -- 1, 2, 3 ... without gaps
    content        TEXT NOT NULL,            -- JCS: {facts, k, kind, outcome, recorded, subtype, t, type}
    prev_hash      BLOB NOT NULL,            -- hash of entry seq-1 (32 zero bytes for entry 1)
    hash           BLOB NOT NULL,            -- SHA-256(prev_hash || seq || "\n" || content)
    kind           TEXT    GENERATED ALWAYS AS (json_extract(content, '$.kind')) VIRTUAL,
    t              INTEGER GENERATED ALWAYS AS (json_extract(content, '$.t')) VIRTUAL,      -- recorded, ms since 1970 UTC
    type_system    TEXT    GENERATED ALWAYS AS (json_extract(content, '$.type[0]')) VIRTUAL,
    type_code      TEXT    GENERATED ALWAYS AS (json_extract(content, '$.type[1]')) VIRTUAL,
    subtype_system TEXT    GENERATED ALWAYS AS (json_extract(content, '$.subtype[0]')) VIRTUAL,
    subtype_code   TEXT    GENERATED ALWAYS AS (json_extract(content, '$.subtype[1]')) VIRTUAL,
    outcome        TEXT    GENERATED ALWAYS AS (json_extract(content, '$.outcome')) VIRTUAL
);

-- Searches sort by date and stop after one page, so every filter index ends in t.
CREATE INDEX IF NOT EXISTS audit_log_t ON audit_log (t);
CREATE INDEX IF NOT EXISTS audit_log_kind_t ON audit_log (kind, t);
CREATE INDEX IF NOT EXISTS audit_log_type_t ON audit_log (type_code, t);
CREATE INDEX IF NOT EXISTS audit_log_subtype_t ON audit_log (subtype_code, t);
CREATE INDEX IF NOT EXISTS audit_log_outcome_t ON audit_log (outcome, t);

-- Many-valued search keys (agent, entity, patient and their :identifier forms),
-- filled from content.k by the trigger below, never by the application.
-- Clustered by entry so verification can compare them entry by entry, in order.
CREATE TABLE IF NOT EXISTS audit_key (
    seq INTEGER NOT NULL,
    p   TEXT NOT NULL,      -- search parameter, e.g. agent:identifier
    v   TEXT NOT NULL,      -- value: reference, identifier value, or SHA-256 hex of a patient identifier
    s   TEXT NOT NULL,      -- identifier system ('' when none)
    PRIMARY KEY (seq, p, v, s)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS audit_key_lookup ON audit_key (p, v, s);

-- Appending is the only way in: the next number, following the last hash (so the chain cannot fork).
CREATE TRIGGER IF NOT EXISTS audit_log_chain BEFORE INSERT ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit log: an entry must follow the last one (seq and prev_hash)')
    WHERE NEW.seq IS NOT coalesce((SELECT max(seq) FROM audit_log), 0) + 1
       OR NEW.prev_hash IS NOT coalesce((SELECT hash FROM audit_log ORDER BY seq DESC LIMIT 1), zeroblob(32));
END;

CREATE TRIGGER IF NOT EXISTS audit_log_index AFTER INSERT ON audit_log
BEGIN
    INSERT INTO audit_key (p, v, s, seq)
    SELECT json_extract(value, '$[0]'), json_extract(value, '$[1]'), json_extract(value, '$[2]'), NEW.seq
    FROM json_each(NEW.content, '$.k');
END;

CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit log: entries are never changed');
END;

CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN
    SELECT RAISE(ABORT, 'audit log: entries are never deleted');
END;

CREATE TRIGGER IF NOT EXISTS audit_key_no_update BEFORE UPDATE ON audit_key
BEGIN
    SELECT RAISE(ABORT, 'audit log: index rows are never changed');
END;

CREATE TRIGGER IF NOT EXISTS audit_key_no_delete BEFORE DELETE ON audit_key
BEGIN
    SELECT RAISE(ABORT, 'audit log: index rows are never deleted');
END;

-- Signed checkpoints: (count, head hash, time) of a log, ours (own = 1) or a
-- peer's that we hold as a witness (own = 0).
CREATE TABLE IF NOT EXISTS audit_checkpoint (
    id       INTEGER PRIMARY KEY,
    own      INTEGER NOT NULL CHECK (own IN (0, 1)),
    member   TEXT NOT NULL,          -- 统一社会信用代码 of the gateway whose log it covers
    count    INTEGER NOT NULL CHECK (count >= 0),
    head     BLOB NOT NULL,          -- hash of entry `count` (32 zero bytes when count = 0)
    time     TEXT NOT NULL,          -- when it was made (instant with offset)
    jws      TEXT NOT NULL,          -- detached compact JWS over the JCS checkpoint payload
    received TEXT,                   -- when we imported it (peer checkpoints)
    UNIQUE (member, count, head)
);

CREATE TRIGGER IF NOT EXISTS audit_checkpoint_no_update BEFORE UPDATE ON audit_checkpoint
BEGIN
    SELECT RAISE(ABORT, 'audit log: checkpoints are never changed');
END;

CREATE TRIGGER IF NOT EXISTS audit_checkpoint_no_delete BEFORE DELETE ON audit_checkpoint
BEGIN
    SELECT RAISE(ABORT, 'audit log: checkpoints are never deleted');
END;
