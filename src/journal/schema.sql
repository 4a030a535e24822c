-- fraudgate journal, schema version 1. Times: *_ms are milliseconds since the Unix epoch
-- (wall clock); event_time is the transaction's own time. seq is the engine's sequence
-- number, shared by both tables: ordering by it replays history exactly.

CREATE TABLE IF NOT EXISTS decisions (
    seq              INTEGER PRIMARY KEY,
    transaction_id   TEXT    NOT NULL,
    account_id       TEXT    NOT NULL,
    merchant_id      TEXT    NOT NULL,
    amount_minor     INTEGER NOT NULL,
    currency         TEXT    NOT NULL,
    event_time       TEXT    NOT NULL, -- RFC 3339, UTC
    event_seconds    INTEGER NOT NULL,
    event_nanos      INTEGER NOT NULL,
    channel          TEXT    NOT NULL, -- CHANNEL_* name from the proto
    merchant_category_code TEXT NOT NULL, -- '' when not given (likewise below)
    country          TEXT    NOT NULL,
    device_id        TEXT    NOT NULL,
    ip_address       TEXT    NOT NULL,
    decision         TEXT    NOT NULL, -- ALLOW, REVIEW, DENY
    score            REAL    NOT NULL,
    anomaly_score    REAL    NOT NULL,
    classifier_score REAL    NOT NULL,
    reasons          TEXT    NOT NULL, -- JSON array of {code, feature, value, contribution, text}
    features         TEXT    NOT NULL, -- JSON array of the feature values as scored (whole
                                       -- numbers as integers), in the server's feature order
                                       -- (view decision_features names them, as REAL)
    model_version    TEXT    NOT NULL,
    scored_at_ms     INTEGER NOT NULL,
    rules_version    INTEGER NOT NULL DEFAULT 0,  -- the rule-set version it was decided under
    policy_decision  TEXT    NOT NULL DEFAULT '', -- the model's and the TOML policy's answer,
                                                  -- before analysts' rules ('' = decision)
    rule_hits        TEXT    NOT NULL DEFAULT ''  -- analysts' rules that hit, space-separated
                                                  -- id@version:ACTION:MODE
);
-- No index on transaction_id, account_id, merchant_id, device_id or ip_address: keys in no
-- order cost a B-tree a page write per row. Those lookups go through journal-lookup/
-- (lookup.rs), an LSM tree the writer fills after each commit.
CREATE INDEX IF NOT EXISTS decisions_scored_at ON decisions (scored_at_ms);
-- The review queue: only the decisions a person looks at (a few in a hundred) are indexed,
-- with the columns its filters read, so a filtered page reads no row it does not show.
CREATE INDEX IF NOT EXISTS decisions_review_queue
    ON decisions (decision, seq, score, amount_minor, merchant_id, event_time)
    WHERE decision IN ('REVIEW', 'DENY');

CREATE TABLE IF NOT EXISTS feedback (
    seq              INTEGER PRIMARY KEY,
    transaction_id   TEXT    NOT NULL,
    label            TEXT    NOT NULL, -- FRAUD, LEGITIMATE
    source           TEXT    NOT NULL, -- FEEDBACK_SOURCE_* name from the proto
    action_taken     TEXT    NOT NULL, -- CLIENT_ACTION_* name from the proto
    reported_at_ms   INTEGER,          -- when the client says it learned it, if given
    received_at_ms   INTEGER NOT NULL,
    applied          INTEGER NOT NULL, -- 0 when the transaction already had this label
    previous_label   TEXT,             -- FRAUD, LEGITIMATE or NULL
    fraud_delta      INTEGER NOT NULL, -- change to the fraud counts: 1, -1 or 0
    reported_by      TEXT              -- the console user (or token name) who gave it
);
CREATE INDEX IF NOT EXISTS feedback_transaction ON feedback (transaction_id);
CREATE INDEX IF NOT EXISTS feedback_received_at ON feedback (received_at_ms);
