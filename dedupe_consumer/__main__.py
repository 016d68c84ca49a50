"""``python -m dedupe_consumer`` is the ``dedupe-consumer`` command."""

from dedupe_consumer.cli import main

main()
