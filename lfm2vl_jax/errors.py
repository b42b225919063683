"""The base class of every error a user can act on (bad checkpoint, bad input, bad option): the CLI
prints these as one line; anything else is a bug and keeps its traceback."""


class Lfm2VlError(ValueError):
    pass
