-- Report versions (gateway.store.reports): which stored copy of a report is current.
-- Run statement by statement inside the transaction that stores a Bundle (created on first use).
CREATE TABLE IF NOT EXISTS report_versions (
    seq            INTEGER PRIMARY KEY AUTOINCREMENT,   -- the order versions were stored in
    issuer_uscc    TEXT NOT NULL,
    report_number  TEXT NOT NULL,
    report_code    TEXT NOT NULL DEFAULT '',  -- system|code of DiagnosticReport.code's first coding
    report_id      TEXT NOT NULL,    -- system|value of identifier[0], as decisions name the report
    report_ref     TEXT NOT NULL,    -- DiagnosticReport/<id>
    bundle_key     TEXT NOT NULL,    -- the Bundle as decisions name it (its identifier value, else its id)
    bundle_id      TEXT NOT NULL,
    direction      TEXT NOT NULL,    -- issued (ingested here) | received (from another member)
    status         TEXT,
    issued         TEXT,
    message_ref    INTEGER,
    recorded_at    TEXT NOT NULL,
    superseded_by  INTEGER REFERENCES report_versions (seq),
    superseded_at  TEXT,
    replaces       TEXT NOT NULL DEFAULT '',  -- the other number a correction names (extension replaces)
    UNIQUE (bundle_key, report_ref, direction)
);
CREATE INDEX IF NOT EXISTS report_versions_report ON report_versions (issuer_uscc, report_number, report_code);
CREATE INDEX IF NOT EXISTS report_versions_bundle ON report_versions (bundle_id);
CREATE INDEX IF NOT EXISTS report_versions_replaces ON report_versions (issuer_uscc, replaces, report_code)
    WHERE replaces <> '';
