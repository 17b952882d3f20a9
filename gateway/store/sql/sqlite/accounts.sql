-- Accounts part of a member gateway's SQLite database: users of the HTTP API and the console, their API
-- tokens, console passwords and sessions, and the backend clients of SMART Backend Services with their
-- access tokens. Applied with CREATE ... IF NOT EXISTS (idempotent); see gateway/store/accounts.py.
-- The replay cache of signed assertions (peer_jti) belongs to the core part.

CREATE TABLE IF NOT EXISTS gateway_user (
    name     TEXT PRIMARY KEY,
    roles    TEXT NOT NULL,        -- space-separated
    member   TEXT,                 -- 统一社会信用代码 of the institution a peer account speaks for
    created  TEXT NOT NULL,
    disabled TEXT                  -- when it was disabled; NULL while active
);
CREATE TABLE IF NOT EXISTS gateway_token (
    hash    TEXT PRIMARY KEY,      -- SHA-256 hex of the token; the token itself is never stored
    user    TEXT NOT NULL REFERENCES gateway_user (name),
    hint    TEXT NOT NULL,         -- first characters, to tell tokens apart in listings
    created TEXT NOT NULL,
    revoked TEXT,
    expires TEXT                   -- when it stops working; NULL: made before tokens expired, never
);
CREATE TABLE IF NOT EXISTS gateway_password (
    user         TEXT PRIMARY KEY REFERENCES gateway_user (name),
    hash         TEXT NOT NULL,    -- Argon2id hash (PHC string); the password itself is never stored
    changed      TEXT NOT NULL,
    failures     INTEGER NOT NULL DEFAULT 0,  -- wrong passwords in a row
    locked_until TEXT              -- ISO time the lock-out ends; NULL when not locked
);
CREATE TABLE IF NOT EXISTS console_session (
    hash    TEXT PRIMARY KEY,      -- SHA-256 hex of the cookie value
    user    TEXT NOT NULL REFERENCES gateway_user (name),
    csrf    TEXT NOT NULL,         -- the token every form of this session carries
    created TEXT NOT NULL,
    seen    TEXT NOT NULL,         -- last use: the idle time-out counts from here
    ended   TEXT
);
-- A user's live sessions, ended together when the password is set.
CREATE INDEX IF NOT EXISTS console_session_user ON console_session ("user", ended);

CREATE TABLE IF NOT EXISTS smart_client (
    client_id TEXT PRIMARY KEY,
    role      TEXT NOT NULL,
    scopes    TEXT NOT NULL,      -- space-separated scopes the client may ask for
    jwks      TEXT,               -- registered public keys (JWKS JSON), unless jwks_url
    jwks_url  TEXT,               -- where the client publishes its JWKS
    created   TEXT NOT NULL,
    disabled  TEXT                -- when it was disabled; NULL while active
);
CREATE TABLE IF NOT EXISTS smart_token (
    hash      TEXT PRIMARY KEY,   -- SHA-256 hex of the access token; the token itself is never stored
    client_id TEXT NOT NULL REFERENCES smart_client (client_id),
    scopes    TEXT NOT NULL,      -- granted
    issued    TEXT NOT NULL,
    expires   REAL NOT NULL       -- seconds since the epoch
);
CREATE INDEX IF NOT EXISTS smart_token_expires ON smart_token (expires);
