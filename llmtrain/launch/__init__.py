"""Launchers: how the worker processes of a run are started (config group `launcher`), and the
exit statuses `python -m llmtrain` reports to whatever started it (a shell, Slurm)."""

# A preempted run (SIGTERM or SIGUSR1) saved its checkpoint and stopped: requeue the job, and the
# same command resumes where it stopped. 0 is a finished run, 1 a failure, 2 a refused config.
REQUEUE_EXIT_CODE = 3


class RunStopped(Exception):
    """A run that ends early for a reason told in plain words, without a traceback: every rank
    raises it at the same point, and the process exits with `exit_code`."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code
