"""The cluster control plane (docs/cluster.md).

One master mints epochs from heartbeat observations, nodes converge, and a stale primary is
fenced at the frontend. Every module here is a sans-IO core: it takes bytes, records and ``now``
(monotonic seconds) and returns bytes, records and decisions; sockets, timers and SQLite live in
thin asyncio layers elsewhere.
"""
