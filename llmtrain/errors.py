"""Errors that end a run with a message in plain words instead of a traceback."""

# The exit status of a run that saved and asks to be run again (preemption): the launchers
# requeue on it (llmtrain.launch).
REQUEUE_EXIT_CODE = 3


class RunStopped(Exception):
    """Raised by every rank at the same point (a preemption, a NaN, a failed save, a refused
    resume); the run prints the message once and exits with `exit_code` (llmtrain.train)."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
