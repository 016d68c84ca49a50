"""Sidecar mode: consume, dedupe, POST each unique event once to a local HTTP endpoint.

* :mod:`~dedupe_consumer.sidecar.settings`: ``SidecarAppSettings``, the core
  settings plus the ``[sidecar]`` section (the core settings do not import it).
  It needs only the core install; ``handler`` (and so ``runner``) needs aiohttp:
  ``pip install "dedupe-consumer[sidecar]"``. This package imports nothing here.
* :mod:`~dedupe_consumer.sidecar.headers`: an event as HTTP headers.
* :mod:`~dedupe_consumer.sidecar.handler`: ``HttpForwardHandler``, one POST per attempt.
* :mod:`~dedupe_consumer.sidecar.health`: ``/healthz``, ``/readyz``, ``/metrics``.
* :mod:`~dedupe_consumer.sidecar.runner`: ``Sidecar``, the wiring of the above
  around the library's ``DedupeConsumer``.
* :mod:`~dedupe_consumer.sidecar.cli`: ``dedupe-consumer sidecar``.
"""
