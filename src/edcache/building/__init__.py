"""Building a cache: plan the missing chunks, compute them on an executor, commit them.

* :mod:`.plan`: which chunks of consecutive indices still have to be computed.
* :mod:`.compute`: what runs inside a worker process (compute a chunk's examples, encode them).
* :mod:`.coordinator`: the build loop, the only writer of a cache.
* :mod:`.executors`: in this process or a local process pool (the Dask executor is
  :mod:`edcache.distributed.executor`).
"""
