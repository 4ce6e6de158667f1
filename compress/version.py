"""The package version, in a module of its own so that modules inside compress read it without
importing the package hub (``compress/__init__.py`` imports nearly every module). The one place
the version is written: pyproject.toml reads it from here."""

__version__ = "0.1.0"
