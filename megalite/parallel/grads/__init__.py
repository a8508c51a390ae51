"""Data-parallel gradients: the flat bucket layout (buckets.py) and the overlapped bucketed
reduction over dp x sp with the global-norm rule (reduce.py)."""
