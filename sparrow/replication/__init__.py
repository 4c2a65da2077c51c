"""The replication channel: a primary forwards a volume's writes to its replicas (docs/replication.md)."""
