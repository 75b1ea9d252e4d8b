"""The one error every export path raises for input it cannot export (its own module, so that every
export module can import it without import cycles)."""

from diffdistill.backbones.loading import CheckpointError


class ExportError(CheckpointError):
    """A run, teacher or output path we cannot export from or to, with the fix in the message."""
