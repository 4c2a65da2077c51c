"""The cluster node process (``sparrow node``): serves volumes as the master assigns them.

- :mod:`sparrow.node.heartbeat_client`: Hello and Heartbeats to the master, Acks back, the lease;
- :mod:`sparrow.node.convergence`: runs the adapter's actions on the local volumes, and the fence;
- :mod:`sparrow.node.daemon`: startup, main loop and shutdown.

See docs/cluster.md for the contracts.
"""
