"""Errors for bad user input: the CLI prints their one-line message and exits with status 2."""


class UserError(ValueError):
    """Bad input from the user (config, data, checkpoint, model path): one clear line."""


class ConfigError(UserError):
    """An invalid configuration file or override."""
