"""Launchers: how the worker processes of a run are started (config group `launcher`)."""
