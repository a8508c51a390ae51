"""The training loop (trainer.py), the step guard (guard.py), metrics and their sinks
(metrics.py) and the step profiler (profiling.py)."""
