"""megalite: a compact 4-D parallel pretraining codebase on plain torch.distributed."""

__version__ = "0.1.0"
