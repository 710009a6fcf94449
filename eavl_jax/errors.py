"""What the command-line programs print for bad input (a config key, a file, a value): one line
`error: ...` on stderr instead of a traceback."""


def error_message(e, limit=1000):
  """'error: <message>' on one line (a multi-line message's lines joined by '; '), cut to `limit`
  characters."""
  text = ''
  for line in filter(None, (line.strip() for line in str(e).splitlines())):
    text += ('' if not text else ' ' if text.endswith(':') else '; ') + line
  return 'error: ' + (text if len(text) <= limit else text[:limit] + ' ...')
