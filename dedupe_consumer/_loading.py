"""Import a handler class named on the command line (``package.module:ClassName``)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

from dedupe_consumer.errors import ConfigError
from dedupe_consumer.handler import Handler


def load_handler_class(spec: str) -> type[Handler]:
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"--handler {spec!r}: expected 'package.module:ClassName'")
    cwd = str(Path.cwd())
    if cwd not in sys.path:
        # Handlers usually live in the project being run. Last, not first: a stray
        # json.py in the current directory must not replace the standard library's.
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"--handler {spec!r}: cannot import {module_name!r}: {exc}") from exc
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Handler)):
        raise ConfigError(
            f"--handler {spec!r}: {attr!r} in {module_name!r} is not a dedupe_consumer.Handler "
            "subclass"
        )
    return cls
