"""``sparrow top``: a live terminal view of the cluster (nodes, volumes, copies, I/O rates).

``snapshot.py`` is the sans-IO core (the master's JSON answers and the nodes' scraped ``/metrics``
-> a frozen :class:`~sparrow.top.snapshot.Snapshot`; rates from two snapshots and their ``now``),
``render.py`` turns a snapshot and its rates into rich renderables, ``cli.py`` fetches, refreshes
and reads the keyboard.
"""
