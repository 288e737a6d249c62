"""The ``edcache`` command line (thin: every command calls a library function)."""
