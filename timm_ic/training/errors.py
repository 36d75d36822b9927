"""The errors `train.py` answers with an exit code and a message instead of a traceback (see its `main`)."""


class UsageError(ValueError):
    """An option value that cannot work; the message says which and how to fix it (exit code 2)."""


class NonFiniteLossError(RuntimeError):
    """The training loss (`what` 'loss'), the weights or the BatchNorm statistics ('weights') became NaN or
    infinite (exit code 3)."""

    def __init__(self, message: str, what: str = 'loss'):
        super().__init__(message)
        self.what = what


class PushError(RuntimeError):
    """--push-to-hub failed after training; the output folder is complete (exit code 4)."""
