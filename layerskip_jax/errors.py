"""The one exception type that means "the user asked for something invalid".

Command lines print such an error as one line on stderr and exit with status 2 (interfaces.md);
anything else that escapes is a failure during the run (exit status 1).
"""


class UsageError(Exception):
  """Bad usage or bad input: a config value, a path, a flag. The message names the value and what is allowed."""


def describe_json(value: object) -> str:
  """What a JSON value is, for a message about a file of the wrong shape: 'an object', 'a list', 'a string',
  'a number', 'a boolean' or 'null'."""
  if value is None:
    return 'null'
  if isinstance(value, bool):
    return 'a boolean'
  return {dict: 'an object', list: 'a list', str: 'a string'}.get(type(value), 'a number')


def one_line(error: BaseException | str, limit: int | None = None) -> str:
  """An error's text on one line (whitespace runs, newlines included, become one space), cut to `limit` characters
  with '...' (tensorstore and Orbax errors carry kilobytes of spec)."""
  text = ' '.join(str(error).split())
  return text if limit is None or len(text) <= limit else text[:limit] + '...'
