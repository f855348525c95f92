"""Errors that are the user's input, not our bugs: the CLI prints them in one line and exits non-zero."""


class UserError(Exception):
    """Bad input (file, config, checkpoint) with a message that names the file/key and the problem."""


class DataError(UserError):
    """A dataset, shard, manifest or raw file that is malformed. The message names the file or molecule."""


class CheckpointError(UserError):
    """A checkpoint that is missing, incomplete or does not match the model/config."""


def one_line(exc: BaseException) -> str:
    """``exc``'s message squeezed onto one line and cut to 200 characters, or its type name when it has none.

    HDF5 and zip errors run to several lines of library internals; a user error is printed as one line, and the
    start of the message is the part that says what went wrong.
    """
    return " ".join(str(exc).split())[:200] or type(exc).__name__
