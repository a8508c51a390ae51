"""The project's error types.

A user mistake (bad config, missing file, broken checkpoint) raises one of these with
a message that says what is wrong, where, and how to fix it. Entry points print the
message without a traceback and exit with a non-zero code; anything else is a bug and
keeps its traceback.
"""


class MegaliteError(Exception):
    """Base of every error a user can fix by changing their input.

    `every_rank`: raised on every rank together, after they agreed on it (a failed
    checkpoint save or load), so the ranks can still leave their groups in order."""

    exit_code = 2
    every_rank = False


def on_every_rank(error: MegaliteError) -> MegaliteError:
    """`error`, marked as raised by every rank together."""
    error.every_rank = True
    return error


class ConfigError(MegaliteError):
    """A config key, value or combination of values is invalid."""


class DataError(MegaliteError):
    """Input data (corpus files, prepared token files, tokenizer) is unusable."""


class CheckpointError(MegaliteError):
    """A checkpoint is missing, incomplete, corrupted or does not fit the model."""
