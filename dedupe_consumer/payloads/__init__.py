"""Payloads: what an event's value is, and where its identity comes from.

* CloudEvents (``dedupe.id_source = "cloudevents"``): binary mode (``ce_*``
  headers) and structured mode (``content-type: application/cloudevents+json``);
  the event ID is the pair (source, id). ``event.cloudevent`` has its attributes.
* Schema Registry payloads (``[payload] format = "avro" | "protobuf" |
  "json-schema"``): decoded once per event by confluent-kafka's deserializers;
  ``dedupe.id_source = "field:/path"`` reads the ID from the decoded record and the
  handler's ``payload_model`` validates it.
"""

from dedupe_consumer.errors import SchemaRegistryUnavailableError
from dedupe_consumer.ids import UnknownSchema
from dedupe_consumer.payloads._cloudevents import CloudEvent
from dedupe_consumer.payloads._decoder import (
    Decoded,
    PayloadDecoder,
    id_reader,
    proto_dict,
    record_json,
)

__all__ = [
    "CloudEvent",
    "Decoded",
    "PayloadDecoder",
    "SchemaRegistryUnavailableError",
    "UnknownSchema",
    "id_reader",
    "proto_dict",
    "record_json",
]
