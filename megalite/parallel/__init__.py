"""Parallelism: collectives (comm), tensor, sequence, pipeline and data parallelism."""
