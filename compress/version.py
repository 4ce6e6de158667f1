"""The package version, in a module of its own so that modules inside compress read it without
importing the package hub (``compress/__init__.py`` imports nearly every module). Keep it equal to
``version`` in pyproject.toml."""

__version__ = "0.1.0"
