"""The models a user's own `.nicd` files were written with, kept in the user's data directory.

A `.nicd` file names its model by the SHA-256 of the model's file, and upgrading nicd replaces the
installed models. `nicd encode` therefore copies the model it used into ``$XDG_DATA_HOME/nicd/models``
(``~/.local/share/nicd/models``) the first time, and `nicd decode` / `nicd info` look there when a
model is no longer installed. (The daemon's archive keeps its models in its database instead, see
:mod:`nicd.store.kept_models`.)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Mapping

from .codec import registry
from .config import data_home
from .fsutil import atomic_write_bytes


def kept_dir(env: Mapping[str, str] | None = None) -> Path:
    return data_home(os.environ if env is None else env) / "nicd" / "models"


def keep(info: registry.ModelInfo, env: Mapping[str, str] | None = None) -> Path:
    """Copy an installed model's file into the user's kept models unless an intact copy is there.

    Raises ModelError when the installed file changed since it was loaded, OSError when the copy
    cannot be written."""
    dest = kept_dir(env) / f"{info.model_id}.npz"
    try:
        if hashlib.sha256(dest.read_bytes()).hexdigest() == info.sha256:
            return dest
    except FileNotFoundError:
        pass
    dest.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(dest, registry.file_bytes(info))
    return dest
