"""edflow's cache layouts: the ``<name>.zip`` of ``example_{i}.p`` pickles and its folder form.

Reading never runs code from the cache: pickles go through :func:`safe_loads`, which
only rebuilds builtin containers and scalars and numpy arrays, dtypes and scalars,
unless the caller passes ``allow_pickle=True``.
"""

from .cachable import read_cachable_length, read_cachable_parameters
from .folder_reader import ExamplesFolder, LegacyFolderReader, is_legacy_folder
from .pickler import legacy_dumps
from .salvage import iter_salvaged_members, salvage_members
from .unpickler import SAFE_GLOBALS, safe_loads
from .zip_reader import LegacyZipReader, example_member
from .zip_writer import LegacyZipEncoder, LegacyZipSink, write_members_zip

__all__ = [
    "SAFE_GLOBALS",
    "ExamplesFolder",
    "LegacyFolderReader",
    "LegacyZipEncoder",
    # Reading
    "LegacyZipReader",
    # Writing
    "LegacyZipSink",
    "example_member",
    "is_legacy_folder",
    "iter_salvaged_members",
    "legacy_dumps",
    "read_cachable_length",
    "read_cachable_parameters",
    # Safety and recovery
    "safe_loads",
    "salvage_members",
    "write_members_zip",
]
