"""The run directory: where every run file lives, writing, reading, checking, progress, background jobs."""
