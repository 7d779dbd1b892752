"""One exception type for every user mistake, so the command line can turn it into one line and exit code 2."""


class UsageError(ValueError):
    """Bad input from the user: the message names the bad value and what is allowed."""
