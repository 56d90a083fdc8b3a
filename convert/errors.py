"""The one exception type the converters raise for bad input; the CLI prints it without a traceback."""


class ConversionError(ValueError):
  """A checkpoint cannot be converted; the message names the file, key or shape at fault."""
