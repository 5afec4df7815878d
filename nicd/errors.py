"""One exception tree for the whole library.

Every error carries a stable `code` (stored in the database and printed by `--json`), and a one-line
message meant for a person. The library raises these; only the CLI decides how to show them.
"""

from __future__ import annotations


class NicdError(Exception):
    code = "E_NICD"

    def __init__(self, message: str, *, code: str | None = None, path: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.path = path

    @property
    def message(self) -> str:
        return str(self.args[0]) if self.args else self.code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message, "path": self.path}


class InputError(NicdError):
    """The input image (or path) cannot be used: missing, not an image, truncated, too large."""

    code = "E_INPUT"


class FormatError(NicdError):
    """A .nicd file is not a valid nicd container: truncated, altered, foreign or unsupported."""

    code = "E_FORMAT"


class VerificationError(NicdError):
    """A bitstream did not decode back to what the encoder produced."""

    code = "E_VERIFY"


class StorageError(NicdError):
    """Writing or reading the store failed (disk full, permissions, database)."""

    code = "E_STORAGE"


class ConfigError(NicdError):
    """A configuration key or value is wrong."""

    code = "E_CONFIG"


class ModelError(NicdError):
    """A model is unknown, or its weights file is missing or does not match its hash."""

    code = "E_MODEL"
