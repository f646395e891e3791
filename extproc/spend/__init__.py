"""Spend in dollars: prices (prices.py), budgets (budgets.py + store.py, redis_store.py)
and the durable ledger (ledger.py). Sans-I/O where it can be; not yet wired into the
request path (docs/spend.md)."""
