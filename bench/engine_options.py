"""The engine's concurrency settings, passed on only when the engine has them.

Issue 13's concurrent engine adds ``processing.concurrency`` and
``processing.ordering``. The benchmark rows that want them are written now:
on an engine without those settings they run as the engine runs (one event at
a time) and say so in the table, and the day the settings exist the same rows
pass them on, with no change to the benchmark.
"""

from __future__ import annotations

from collections.abc import Collection

NO_CONCURRENCY = "n/a (engine has no concurrency yet)"


def processing_fields() -> frozenset[str]:
    """The keys the installed library's ``[processing]`` section accepts."""
    from dedupe_consumer import Settings

    section = Settings.model_fields["processing"].annotation
    fields = getattr(section, "model_fields", None)
    if fields is None:
        raise RuntimeError(f"Settings.processing is {section!r}, not a settings model")
    return frozenset(fields)


def concurrency_settings(
    fields: Collection[str], concurrency: int | None, ordering: str | None
) -> tuple[dict[str, object], str]:
    """The ``[processing]`` keys to add, and what the row says the engine ran with.

    ``fields`` are the keys ``[processing]`` accepts (:func:`processing_fields`).
    Nothing asked for: nothing added, the engine's defaults. Asked for but the
    engine lacks either key: nothing added, and the row says
    :data:`NO_CONCURRENCY`, never a setting it did not get.
    """
    wanted: dict[str, object] = {}
    if concurrency is not None:
        wanted["concurrency"] = concurrency
    if ordering is not None:
        wanted["ordering"] = ordering
    if not wanted:
        return {}, "engine defaults"
    if not {"concurrency", "ordering"} <= set(fields):
        return {}, NO_CONCURRENCY
    return wanted, ", ".join(f"{key} {value}" for key, value in wanted.items())
