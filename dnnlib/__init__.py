"""Small dependency-free helpers shared by every script (EasyDict, URL opening, name lookup).

The module path `dnnlib.util.EasyDict` is part of the pickle format: NVIDIA EDM snapshots store
their `dataset_kwargs` as this class, so it must keep this name.
"""

from .util import EasyDict, make_cache_dir_path
