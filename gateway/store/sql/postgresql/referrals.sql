-- Referrals of violations (移送), made here or received as the authority (gateway.referrals).
CREATE TABLE IF NOT EXISTS referrals (
    id           TEXT PRIMARY KEY,   -- the Task's business identifier, the same on both sides
    side         TEXT NOT NULL,      -- requester (referred from here) | owner (this gateway is the authority)
    status       TEXT NOT NULL,
    reason       TEXT NOT NULL,
    requester    TEXT NOT NULL,
    owner        TEXT NOT NULL,
    issuer       TEXT,
    report       TEXT NOT NULL,      -- the focus: DiagnosticReport reference
    decision_id  TEXT,
    bundle_hash  TEXT,
    note         TEXT,
    task         TEXT NOT NULL,      -- the latest Task (JSON)
    receipt      TEXT,               -- the signed receipt this gateway gave for the referral (owner side)
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);
