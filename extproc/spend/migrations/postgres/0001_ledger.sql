-- One row per exchange; request_id makes every insert idempotent.
CREATE TABLE spend_ledger (
    request_id text PRIMARY KEY,
    ts_ms bigint NOT NULL,
    consumer text NOT NULL DEFAULT '',
    team text NOT NULL DEFAULT '',
    route text NOT NULL DEFAULT '',
    provider text NOT NULL DEFAULT '',
    model text NOT NULL DEFAULT '',
    prompt_tokens bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cached_tokens bigint NOT NULL DEFAULT 0,
    cache_write_tokens bigint NOT NULL DEFAULT 0,
    reasoning_tokens bigint NOT NULL DEFAULT 0,
    cost_micros bigint NOT NULL DEFAULT 0,
    status text NOT NULL DEFAULT 'completed',
    reason text NOT NULL DEFAULT ''
);
CREATE INDEX spend_ledger_ts ON spend_ledger (ts_ms);
