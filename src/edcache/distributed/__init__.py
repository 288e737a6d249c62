"""Building caches on a Dask cluster: ``edcache --server`` and ``edcache --address``.

* :mod:`.config`: the settings all of them share (default port, worker TTL, Dask
  configuration, logging, status messages).
* :mod:`.security`: the cluster's credentials (mutual TLS, generated on first start).
* :mod:`.executor`: :class:`~.executor.DaskExecutor`, the executor the build coordinator
  drives to compute chunks on the cluster.
* :mod:`.server`: the scheduler plus the build coordinator in one process.
* :mod:`.worker`: worker processes that connect to a server, and reconnect.

Imports go one way: ``config`` and ``security`` import nothing of the others,
``worker`` and ``executor`` import only those two, ``server`` imports the rest.
"""
