"""Planning a run: the memory / FLOPs estimator (estimate.py, with the parameter and
optimizer-state part in state.py) and the layout planner (planner.py)."""
