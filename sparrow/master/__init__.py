"""The cluster master: ``sparrow master`` (docs/cluster.md).

The thin asyncio layers around the sans-IO cores of ``sparrow.cluster``:

- :mod:`sparrow.master.heartbeat_server`: one asyncio Protocol per node connection; feeds bytes to
  the heartbeat codec, records Hello/Heartbeat in the ObservationStore, answers every Heartbeat
  with an Ack (lease + the node's assignments) and records the lease it granted.
- :mod:`sparrow.master.control`: the control loop; asks the TopologyController what to change and
  has the Publisher (the only epoch mint) record it.
- :mod:`sparrow.master.api`: the HTTP control API, /metrics and /healthz.
- :mod:`sparrow.master.daemon`: startup, main loop and shutdown.
"""
