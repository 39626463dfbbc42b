"""The one exception type for mistakes a user can fix.

Library code raises PipelineError with a message that says what was wrong and what to
do; the CLI turns it into a one-line error and a non-zero exit, never a traceback.
"""


class PipelineError(Exception):
    """A user-facing failure: bad input, missing data, unknown run, failed check."""

    exit_code = 1
