"""The one exception type a user is meant to read.

A `UserError` carries a single line that names the file, key or shard at fault and what to do about it.
Stages print it as `error: <line>` and exit with status 2, with no traceback (see `daychat.cli`).
"""


class UserError(Exception):
    """Bad input a person can fix: a missing file, a corrupt shard, a typo in params.yaml."""
