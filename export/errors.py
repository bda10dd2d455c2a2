"""Errors of softprompt.export (torch-free, so the bundle loader can raise them)."""


class BundleError(ValueError):
    """A bundle directory that cannot be served: a file is missing, altered or inconsistent
    with ``bundle.json``. The message is one line naming the file and what mismatched."""


class ExportValidationError(RuntimeError):
    """The exported graph disagrees with the PyTorch model: names, axes or values."""
