"""User-facing errors: bad input gets one clear line (what is wrong, how to fix it), no traceback."""


class UserError(Exception):
    """An error caused by user input (config, data, workdir). The CLI prints `error: <message>` and exits 2."""
