"""The one exception type users see: the CLI turns it into a one-line message and exit code 2."""


class SealftError(Exception):
    """A user-facing error: the message names the file / row / flag at fault and the fix."""


class DataError(SealftError):
    """Bad input data (missing file, malformed row, unknown format, duplicate ids...)."""


class ConfigError(SealftError):
    """A bad option value; the message names the flag."""


class ModelError(SealftError):
    """A model / tokenizer / adapter that cannot be resolved or used."""


class TrainingError(SealftError):
    """Training cannot continue (e.g. a non-finite loss)."""
