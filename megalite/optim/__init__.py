"""Optimizer side of training: the learning-rate schedule (schedule.py), the ZeRO
sharded optimizer (zero.py) and the fp16 loss scaler (scaler.py)."""

from megalite.optim.schedule import LRSchedule

__all__ = ["LRSchedule"]
