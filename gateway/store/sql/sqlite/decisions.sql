-- Recognition part: decisions, physicians' overrides and withdrawals (gateway.recognition.store).
-- Three append-only tables (triggers refuse UPDATE and DELETE); created when first used.

CREATE TABLE IF NOT EXISTS recognition_decisions (
    decision_id      TEXT PRIMARY KEY,
    bundle_id        TEXT,
    entry            TEXT NOT NULL,
    report_id        TEXT,
    patient_system   TEXT,
    patient_value    TEXT,
    issuer_uscc      TEXT,
    receiver_uscc    TEXT NOT NULL,
    catalogue_id     TEXT,
    item_code        TEXT,
    item_label       TEXT,
    outcome          TEXT NOT NULL CHECK (outcome IN ('recognized', 'not-recognized', 'needs-review')),
    snapshot_version INTEGER NOT NULL,
    snapshot_digest  TEXT NOT NULL,
    decided_at       TEXT NOT NULL,  -- UTC, so that text order is time order
    recorded_at      TEXT NOT NULL,
    decision_json    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recognition_decisions_patient ON recognition_decisions (patient_value, patient_system);
CREATE INDEX IF NOT EXISTS recognition_decisions_issuer ON recognition_decisions (issuer_uscc, decided_at);
CREATE INDEX IF NOT EXISTS recognition_decisions_item ON recognition_decisions (item_code, decided_at);
CREATE INDEX IF NOT EXISTS recognition_decisions_outcome ON recognition_decisions (outcome, decided_at);
-- the decisions on one report version, withdrawn when a correction supersedes it
CREATE INDEX IF NOT EXISTS recognition_decisions_report ON recognition_decisions (bundle_id, report_id);
CREATE TABLE IF NOT EXISTS recognition_overrides (
    override_id      INTEGER PRIMARY KEY AUTOINCREMENT,
    decision_id      TEXT NOT NULL REFERENCES recognition_decisions (decision_id),
    reason           TEXT NOT NULL,
    physician_system TEXT NOT NULL,
    physician_id     TEXT NOT NULL,
    note             TEXT,
    recorded_at      TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS recognition_overrides_decision ON recognition_overrides (decision_id);
CREATE TRIGGER IF NOT EXISTS recognition_decisions_no_update BEFORE UPDATE ON recognition_decisions
 BEGIN SELECT RAISE(ABORT, 'recognition_decisions is append-only'); END;
CREATE TRIGGER IF NOT EXISTS recognition_decisions_no_delete BEFORE DELETE ON recognition_decisions
 BEGIN SELECT RAISE(ABORT, 'recognition_decisions is append-only'); END;
CREATE TRIGGER IF NOT EXISTS recognition_overrides_no_update BEFORE UPDATE ON recognition_overrides
 BEGIN SELECT RAISE(ABORT, 'recognition_overrides is append-only'); END;
CREATE TRIGGER IF NOT EXISTS recognition_overrides_no_delete BEFORE DELETE ON recognition_overrides
 BEGIN SELECT RAISE(ABORT, 'recognition_overrides is append-only'); END;
-- Added after the first release: created last, so that its absence tells an older database.
CREATE TABLE IF NOT EXISTS recognition_withdrawals (
    decision_id      TEXT PRIMARY KEY REFERENCES recognition_decisions (decision_id),
    reason           TEXT NOT NULL,
    superseded_by    TEXT NOT NULL,  -- the report that superseded the one decided on
    withdrawn_at     TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS recognition_withdrawals_no_update BEFORE UPDATE ON recognition_withdrawals
 BEGIN SELECT RAISE(ABORT, 'recognition_withdrawals is append-only'); END;
CREATE TRIGGER IF NOT EXISTS recognition_withdrawals_no_delete BEFORE DELETE ON recognition_withdrawals
 BEGIN SELECT RAISE(ABORT, 'recognition_withdrawals is append-only'); END;
