"""Pipeline parallelism: the stage split (stage.py) and the schedules with the p2p engine
that runs them (engine.py)."""
