"""The one error type for user mistakes: the CLI prints it as one line and exits non-zero."""


class RelaError(Exception):
    """A problem with the user's input (options, data, priors, banks), not a bug in rela."""
