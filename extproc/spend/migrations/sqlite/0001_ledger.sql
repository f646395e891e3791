-- One row per exchange; request_id makes every insert idempotent.
CREATE TABLE spend_ledger (
    request_id TEXT PRIMARY KEY,
    ts_ms INTEGER NOT NULL,
    consumer TEXT NOT NULL DEFAULT '',
    team TEXT NOT NULL DEFAULT '',
    route TEXT NOT NULL DEFAULT '',
    provider TEXT NOT NULL DEFAULT '',
    model TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cached_tokens INTEGER NOT NULL DEFAULT 0,
    cache_write_tokens INTEGER NOT NULL DEFAULT 0,
    reasoning_tokens INTEGER NOT NULL DEFAULT 0,
    cost_micros INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL DEFAULT 'completed',
    reason TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX spend_ledger_ts ON spend_ledger (ts_ms);
