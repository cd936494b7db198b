"""User-facing errors: the CLI prints these as one line, without a traceback."""


class SalomiError(Exception):
    """A problem with the user's input that they can fix; the message says how."""
