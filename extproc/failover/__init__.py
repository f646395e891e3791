"""Failover and load balancing across an alias's targets: `plan` (sans-I/O: targets,
target sets, circuit state), `stage` (router level: which targets a request may try,
charging the one that answered), `attempt` (the upstream filter: each attempt
credentialed for its target). Envoy makes the attempts ([failover.md](failover.md))."""
