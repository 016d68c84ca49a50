"""The dead-letter topic, read and redriven: ``dedupe-consumer dlq list|redrive``.

:mod:`dedupe_consumer.dlq.letters` reads a dead letter's ``dlq.*`` headers back
(no Kafka); :mod:`dedupe_consumer.dlq.cli` holds the commands. A redriven message
carries ``dedupe.redrive`` (:data:`~dedupe_consumer.dead_letters.REDRIVE_HEADER`):
the engine handles an ID whose record says *dead-lettered* once more when a copy
carries it; an ID that was handled stays a duplicate.
"""

from dedupe_consumer.dlq.letters import Letter, LetterFilter, parse_letter

__all__ = ["Letter", "LetterFilter", "parse_letter"]
