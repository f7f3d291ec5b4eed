"""Kernel settings for benchmarks: module-level values a Pallas kernel reads when traced."""
from __future__ import annotations

import contextlib


@contextlib.contextmanager
def module_settings(module, settings: dict):
  """`settings` ({name: value}) set on `module` inside the block, the old values restored after,
  also when the block raises. Names the module lacks are refused, so a typo cannot pass as a
  variant that silently measured the defaults."""
  missing = [name for name in settings if not hasattr(module, name)]
  if missing:
    raise AttributeError(f"{module.__name__} has no setting {', '.join(missing)}")
  saved = {name: getattr(module, name) for name in settings}
  for name, value in settings.items():
    setattr(module, name, value)
  try:
    yield
  finally:
    for name, value in saved.items():
      setattr(module, name, value)
