"""The one exception hierarchy of hansgate.

::

    HansgateError                 base; the CLI maps it to exit code 2, the service to 4xx/5xx
    ├── InputError                bad user input: missing file, wrong shape, unknown name
    │   ├── DataError             a dataset that cannot be read or has the wrong shape/dtype
    │   ├── ModelLoadError        a model spec or weights file that cannot be loaded safely
    │   ├── ConfigError           an unknown method/option or an invalid hyper-parameter
    │   └── RequestError          a service request the gateway refuses; ``reason`` names why (counted)
    ├── ModelRunError             the model does not run on the data (shape mismatch, NaN, ...)
    ├── BundleError               a bundle that is missing, tampered with or inconsistent
    │   ├── BundleHashError       a file's sha256 differs from the manifest
    │   ├── SchemaVersionError    a manifest schema version this build does not know
    │   └── SignatureError        a signature that is missing, malformed or not from the trusted key
    └── ExportError               the exported graph disagrees with torch; nothing is written

The CLI (``hansgate.cli``) and the service (``service.errors``) map these to exit
codes and HTTP statuses, each in one place.
"""

from __future__ import annotations

__all__ = [
    "HansgateError",
    "InputError",
    "DataError",
    "ModelLoadError",
    "ConfigError",
    "RequestError",
    "ModelRunError",
    "BundleError",
    "BundleHashError",
    "SchemaVersionError",
    "SignatureError",
    "ExportError",
]


class HansgateError(Exception):
    """Base of every error hansgate raises on purpose; its message is one line for the user."""


class InputError(HansgateError):
    """The user gave something hansgate cannot use."""


class DataError(InputError):
    """A dataset is missing, unreadable, or has the wrong shape or dtype."""


class ModelLoadError(InputError):
    """A model specification or weights file cannot be loaded (safely)."""


class ConfigError(InputError):
    """An unknown method name, option, or an invalid hyper-parameter value."""


class RequestError(InputError):
    """A request the service refuses; ``reason`` is a short bounded token it is counted under."""

    def __init__(self, message: str, reason: str = "invalid") -> None:
        super().__init__(message)
        self.reason = reason


class ModelRunError(HansgateError):
    """The model fails on the data it was given."""


class BundleError(HansgateError):
    """A bundle directory is missing, inconsistent, or was tampered with."""


class BundleHashError(BundleError):
    """A bundle file's sha256 does not match its manifest."""


class SchemaVersionError(BundleError):
    """The manifest declares a schema version this build does not understand."""


class SignatureError(BundleError):
    """A bundle's detached signature is missing, malformed, or does not verify with the trusted key."""


class ExportError(HansgateError):
    """The exported ONNX graph disagrees with the torch model; no bundle is written."""
