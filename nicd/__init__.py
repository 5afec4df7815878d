"""nicd — neural image compression daemon."""

__version__ = "0.1.0"
