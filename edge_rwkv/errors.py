"""Exceptions the runtime raises for bad input; each message names the file or value at fault."""


class EdgeRWKVError(Exception):
    """Base class: the CLI prints these as one line, without a traceback."""


class CheckpointError(EdgeRWKVError):
    """A model file is unreadable, of another RWKV version, or inconsistent."""


class StateError(EdgeRWKVError):
    """A state file is corrupt, of another format version, or belongs to another model."""


class InputError(EdgeRWKVError, ValueError):
    """Tokens, shapes or sampling settings are out of range."""
