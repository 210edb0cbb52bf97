"""The model's one error type, below every other module of the package."""


class ConfigError(ValueError):
  """An invalid model configuration; the message names the field and the fix."""
