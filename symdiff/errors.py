"""Errors that are the user's input, not our bugs: the CLI prints them in one line and exits non-zero."""


class UserError(Exception):
    """Bad input (file, config, checkpoint) with a message that names the file/key and the problem."""


class DataError(UserError):
    """A dataset, shard, manifest or raw file that is malformed. The message names the file or molecule."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match the model/config."""
