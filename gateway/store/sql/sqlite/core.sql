-- Core part of a member gateway's SQLite database (messages, stages, FHIR resources, search index).
-- Applied at start-up with CREATE ... IF NOT EXISTS; other parts (audit, recognition) add their own tables.

-- Every unit of input exactly as received, stored before any processing.
CREATE TABLE IF NOT EXISTS messages (
    id          INTEGER PRIMARY KEY,
    channel     TEXT NOT NULL,              -- mllp | http | file
    format      TEXT NOT NULL,              -- hl7v2 | cda | cdc-csv | fhir
    sender      TEXT NOT NULL DEFAULT '',   -- e.g. MSH-3|MSH-4
    message_id  TEXT NOT NULL DEFAULT '',   -- e.g. MSH-10
    origin      TEXT NOT NULL DEFAULT '',   -- file name or peer address
    received_at TEXT NOT NULL,
    size        INTEGER NOT NULL,
    sha256      TEXT NOT NULL,
    raw         BLOB NOT NULL,
    status      TEXT NOT NULL,              -- received | queued | filtered | refused | stored | failed
                                            -- (received: being worked, under a lease)
    ack_code    TEXT,                       -- AA | AE | AR (or HTTP outcome for non-HL7 formats)
    ack         BLOB,                       -- the answer sent, re-sent as is for a duplicate
    issues      TEXT NOT NULL DEFAULT '[]', -- JSON list of issues found
    bundle_id   TEXT,
    updated_at  TEXT NOT NULL,
    lease_owner TEXT,                       -- the process working it now (host:pid), NULL when nobody is
    lease_until REAL,                       -- epoch seconds the holder's lease runs until
    attempts    INTEGER NOT NULL DEFAULT 0  -- how often a process took it on (a crash in the middle counts)
);
-- A resent message (same format, sender and id) is recognised by this key, not by searching first.
CREATE UNIQUE INDEX IF NOT EXISTS messages_dedup ON messages(format, sender, message_id) WHERE message_id <> '';
CREATE INDEX IF NOT EXISTS messages_status ON messages(status, id);
-- the messages of a recent window (the console's overview), without reading every message ever received
CREATE INDEX IF NOT EXISTS messages_received ON messages(received_at);
-- a sender's messages waiting in the queue, in the order they came: whether one came before a message a queue
-- reader works (its turn to be recorded), without reading the whole queue however long it is; only queued rows
CREATE INDEX IF NOT EXISTS messages_queued_sender ON messages(sender, id) WHERE status = 'queued';

-- What happened to each message, stage by stage.
CREATE TABLE IF NOT EXISTS message_stages (
    message_ref INTEGER NOT NULL REFERENCES messages(id),
    stage       TEXT NOT NULL,
    status      TEXT NOT NULL,
    at          TEXT NOT NULL,
    detail      TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS message_stages_ref ON message_stages(message_ref);

-- Current version of every FHIR resource held. ``rid`` is a stable row number, given in the order
-- resources first arrive and kept by later versions: the search index refers to it, so index rows
-- of a new resource are appended at the end of their B-trees instead of scattered by a random id.
CREATE TABLE IF NOT EXISTS resources (
    rid          INTEGER PRIMARY KEY,
    type         TEXT NOT NULL,
    id           TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    message_ref  INTEGER REFERENCES messages(id),
    json         TEXT NOT NULL,
    UNIQUE (type, id)
);
-- Earlier versions: a correction never destroys what was there before.
CREATE TABLE IF NOT EXISTS resource_history (
    type         TEXT NOT NULL,
    id           TEXT NOT NULL,
    version      INTEGER NOT NULL,
    last_updated TEXT NOT NULL,
    message_ref  INTEGER,
    json         TEXT NOT NULL,
    PRIMARY KEY (type, id, version)
);

-- Search index: token parameters (identifier, code, status, patient.identifier, ...). Every distinct value
-- (type, parameter, code, system) is written once, in ``search_key``, and named by a number there; a resource's
-- values are the narrow rows (key, res) of ``search_token`` (``res`` is ``resources.rid``). Most of a report's
-- values (a LOINC code, ``final``, the laboratory, the patient) are known already, so storing one adds small rows
-- only. A search reads one contiguous range of ``search_token`` per value; ``owner`` finds a resource's rows when
-- it is replaced. Values are never removed from ``search_key`` (a rebuilt index keeps their numbers).
CREATE TABLE IF NOT EXISTS search_key (
    key    INTEGER PRIMARY KEY,
    type   TEXT NOT NULL,
    param  TEXT NOT NULL,
    code   TEXT NOT NULL,
    system TEXT NOT NULL DEFAULT '',
    UNIQUE (type, param, code, system)
);
CREATE INDEX IF NOT EXISTS search_key_system ON search_key(type, param, system);
CREATE TABLE IF NOT EXISTS search_token (
    key    INTEGER NOT NULL,
    res    INTEGER NOT NULL,
    PRIMARY KEY (key, res)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_token_owner ON search_token(res);

-- Search index: date parameters as [lo, hi) in epoch seconds (precision of the value kept as a range).
CREATE TABLE IF NOT EXISTS search_date (
    type  TEXT NOT NULL,
    param TEXT NOT NULL,
    lo    REAL NOT NULL,
    hi    REAL NOT NULL,
    res   INTEGER NOT NULL,
    PRIMARY KEY (type, param, lo, hi, res)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_date_owner ON search_date(res);

-- Search index: the strings of HumanNames (Patient name, family, given), which string search compares
-- (``folded``: lower case, accents removed, by the gateway's fold_string), so that a name search reads the
-- names of one parameter, not every Patient's JSON. Filled from the Patients already stored when a database of
-- an earlier release gains it (gateway.store.store.ensure_name_strings).
CREATE TABLE IF NOT EXISTS search_string (
    type   TEXT NOT NULL,
    param  TEXT NOT NULL,
    folded TEXT NOT NULL,
    exact  TEXT NOT NULL,
    res    INTEGER NOT NULL,
    PRIMARY KEY (type, param, folded, exact, res)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS search_string_owner ON search_string(res);

-- Signed report Bundles: those this member issued (signed here) and those received (verified here).
CREATE TABLE IF NOT EXISTS signed_bundles (
    bundle_id     TEXT NOT NULL,
    doc_sha256    TEXT NOT NULL,        -- SHA-256 of the signed document bytes (RFC 8785, no signature/id/meta)
    issuer_uscc   TEXT NOT NULL,
    patient_keys  TEXT NOT NULL,        -- JSON list of "system|value" of the subject's identifiers
    direction     TEXT NOT NULL,        -- issued (signed here) | received (verified here)
    text          BLOB NOT NULL,        -- the signed JSON text, deflated (zlib; gateway.store.exchange.unpacked
                                        -- gives it back byte for byte; earlier releases kept it as is)
    signed_at     TEXT NOT NULL,
    message_ref   INTEGER,
    PRIMARY KEY (doc_sha256)
);
CREATE INDEX IF NOT EXISTS signed_bundles_bundle ON signed_bundles(bundle_id);
-- the latest Bundles received (the console's exchange page), without reading every Bundle issued here; partial,
-- so that a lookup by Bundle id never takes it for the index to use
CREATE INDEX IF NOT EXISTS signed_bundles_received ON signed_bundles(signed_at DESC, doc_sha256) WHERE direction = 'received';
-- The patient identifiers of the Bundles issued here, one row each: how 调阅 finds a patient's Bundles without
-- reading every Bundle ever issued (filled with each Bundle kept; gateway.store.store fills it for older ones).
CREATE TABLE IF NOT EXISTS signed_bundle_patients (
    value       TEXT NOT NULL,          -- the identifier's value
    system      TEXT NOT NULL,          -- its system ('' when none)
    doc_sha256  TEXT NOT NULL,          -- the signed Bundle (signed_bundles.doc_sha256)
    PRIMARY KEY (value, system, doc_sha256)
) WITHOUT ROWID;

-- Deliveries to other member gateways (gateway.exchange.outbox).
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY,
    destination     TEXT NOT NULL,              -- USCC of the receiving member
    url             TEXT NOT NULL,              -- its exchange endpoint
    kind            TEXT NOT NULL,              -- bundle
    payload         BLOB NOT NULL,              -- exactly the bytes sent
    payload_sha256  TEXT NOT NULL,
    status          TEXT NOT NULL,              -- pending | delivering | delivered | dead
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,              -- epoch seconds
    lease_until     REAL,
    last_error      TEXT NOT NULL DEFAULT '',
    receipt         TEXT,
    created_at      TEXT NOT NULL,
    updated_at      TEXT NOT NULL,
    lease_owner     TEXT,                       -- host:pid of the process delivering it
    earlier_attempts INTEGER NOT NULL DEFAULT 0, -- attempts made before an operator put it back
    UNIQUE (destination, payload_sha256)
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox(status, next_attempt_at);
-- where a signed Bundle went (a correction follows its original there), without reading every delivery
CREATE INDEX IF NOT EXISTS outbox_payload ON outbox(payload_sha256);

-- Peer assertion ids seen, kept until the assertion expires (replay protection).
CREATE TABLE IF NOT EXISTS peer_jti (iss TEXT NOT NULL, jti TEXT NOT NULL, exp REAL NOT NULL, PRIMARY KEY (iss, jti));
CREATE INDEX IF NOT EXISTS peer_jti_exp ON peer_jti(exp);
