"""The one exception type that means "the user asked for something invalid".

Command lines print such an error as one line on stderr and exit with status 2 (interfaces.md);
anything else that escapes is a failure during the run (exit status 1).
"""


class UsageError(Exception):
  """Bad usage or bad input: a config value, a path, a flag. The message names the value and what is allowed."""
