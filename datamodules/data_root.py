"""``DataRoot``: the type of the DataModules' ``root`` and ``predict_root`` arguments.

In Python it is a plain ``str`` (pass any path). On the command line it marks the argument as a data
folder, so that ``train.py`` can read a relative root written in a config file relative to that
file's folder, from whatever folder the command runs in, and one typed on the command line relative
to the working folder, as every typed path is (``callbacks.recipes.register_data_roots``).
"""

from __future__ import annotations


class DataRoot(str):
    """A data folder, as a ``str``; relative roots in a config file are relative to the file (see above)."""
