"""The one error of the batch-scoring job."""

from __future__ import annotations


class JobError(ValueError):
    """A job that cannot start or resume; the message says what is wrong and what to do."""
