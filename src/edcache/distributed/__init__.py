"""Building caches on a Dask cluster: ``edcache --server`` and ``edcache --address``.

* :mod:`.security`: the cluster's credentials (mutual TLS, generated on first start).
* :mod:`.server`: the scheduler plus the build coordinator in one process.
* :mod:`.worker`: worker processes that connect to a server, and reconnect.

The executor the coordinator drives is :class:`edcache.building.executors.dask.DaskExecutor`.
"""
