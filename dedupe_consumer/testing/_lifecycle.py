"""What the test brokers share: ``start``/``stop``, use as a context manager, a stop at exit."""

from __future__ import annotations

import atexit
from abc import ABC, abstractmethod
from types import TracebackType
from typing import ClassVar, Self

__all__ = ["Lifecycle"]


class Lifecycle(ABC):
    """Something a test starts and must stop: a broker, a cluster of them.

    ``with`` starts it unless it is started already and stops it at the end;
    :meth:`_stop_at_exit` has ``stop()`` run when the interpreter exits, for a test
    that never calls it. ``repr`` is ``<_repr_name>(<_repr_details()>)``.
    """

    _repr_name: ClassVar[str]
    _atexit_registered: bool = False

    @abstractmethod
    def start(self) -> Self: ...

    @abstractmethod
    def stop(self) -> None:
        """Stop and clean up; idempotent. Implementations call :meth:`_forget_stop_at_exit`."""

    @property
    @abstractmethod
    def _started(self) -> bool: ...

    @abstractmethod
    def _repr_details(self) -> str: ...

    def _stop_at_exit(self) -> None:
        """Have ``stop()`` run at interpreter exit (once, however often it is asked)."""
        if not self._atexit_registered:
            atexit.register(self.stop)
            self._atexit_registered = True

    def _forget_stop_at_exit(self) -> None:
        if self._atexit_registered:
            atexit.unregister(self.stop)
            self._atexit_registered = False

    def __enter__(self) -> Self:
        if not self._started:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"{self._repr_name}({self._repr_details()})"
