"""Import a handler class named on the command line (``package.module:ClassName``)."""

from __future__ import annotations

import difflib
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
    except ModuleNotFoundError as exc:
        if exc.name is not None and (module_name + ".").startswith(exc.name + "."):
            raise ConfigError(
                f"--handler {spec!r}: cannot import {module_name!r}: no module named "
                f"{exc.name!r} on the Python path (the current directory {cwd} included): "
                "check the name, or install the package"
            ) from None
        raise _import_failed(spec, module_name, exc) from exc
    except Exception as exc:  # the module itself raised while being imported
        raise _import_failed(spec, module_name, exc) from exc
    cls = getattr(module, attr, None)
    if isinstance(cls, type) and issubclass(cls, Handler):
        return cls
    handlers = sorted(
        name
        for name, value in vars(module).items()
        if isinstance(value, type) and issubclass(value, Handler) and value is not Handler
    )
    found = (
        f"the Handler subclasses it has: {', '.join(handlers)}"
        if handlers
        else "it defines no Handler subclass"
    )
    if cls is None:
        close = difflib.get_close_matches(attr, handlers, n=1)
        guess = f"did you mean {close[0]!r}? " if close else ""
        raise ConfigError(
            f"--handler {spec!r}: module {module_name!r} has no attribute {attr!r}; {guess}{found}"
        )
    raise ConfigError(
        f"--handler {spec!r}: {attr!r} in {module_name!r} is not a dedupe_consumer.Handler "
        f"subclass; {found}"
    )


def _import_failed(spec: str, module_name: str, exc: BaseException) -> ConfigError:
    return ConfigError(
        f"--handler {spec!r}: importing {module_name!r} failed inside the module: "
        f"{type(exc).__name__}: {exc}"
    )
