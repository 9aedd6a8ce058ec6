"""The package version, in one module that imports nothing (so no module imports the package root for it)."""

__version__ = "0.1.0"
