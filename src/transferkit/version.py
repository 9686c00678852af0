"""The version of transferkit, alone, so nothing imports the package face to read it."""

__version__ = "0.1.0"
