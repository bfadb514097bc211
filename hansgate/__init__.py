"""hansgate: the shared contract between refinement, service and audit.

This package holds only what every part needs and that must not pull in torch:
the error hierarchy, the bundle manifest and its verification, and the CLI entry.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("hansgate")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
