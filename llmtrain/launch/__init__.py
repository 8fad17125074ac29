"""Launchers: how the worker processes of a run are started (config group `launcher`)."""

# The exit status of a preempted run (SIGTERM or SIGUSR1) that saved its checkpoint: requeue the
# job; the same command resumes where it stopped (docs/reliability.md lists every status).
REQUEUE_EXIT_CODE = 3
