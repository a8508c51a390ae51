"""Distributed safetensors checkpoints: the on-disk format with atomic commit and checksums
(format.py), which rank writes and reads which piece (sharding.py), offline resharding
(reshard.py) and inspection (inspect.py). docs/checkpoint-format.md describes the files."""
