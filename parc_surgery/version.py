"""The package version, in its own module so any module can read it without importing ``parc_surgery/__init__``."""

__all__ = ["__version__"]

__version__ = "0.1.0"
