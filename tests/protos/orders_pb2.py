"""``dedupe.test.Order``, as protoc would generate it from::

    syntax = "proto3";
    package dedupe.test;
    message Customer { string id = 1; }
    message Order { string order_id = 1; int64 amount = 2; Customer customer = 3; }

Built from its descriptor at import, so the tests need no protoc.
"""

from __future__ import annotations

from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

_F = descriptor_pb2.FieldDescriptorProto


def _file() -> descriptor_pb2.FileDescriptorProto:
    proto = descriptor_pb2.FileDescriptorProto(
        name="dedupe/test/orders.proto", package="dedupe.test", syntax="proto3"
    )
    customer = proto.message_type.add(name="Customer")
    customer.field.add(name="id", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    order = proto.message_type.add(name="Order")
    order.field.add(name="order_id", number=1, type=_F.TYPE_STRING, label=_F.LABEL_OPTIONAL)
    order.field.add(name="amount", number=2, type=_F.TYPE_INT64, label=_F.LABEL_OPTIONAL)
    order.field.add(
        name="customer",
        number=3,
        type=_F.TYPE_MESSAGE,
        type_name=".dedupe.test.Customer",
        label=_F.LABEL_OPTIONAL,
    )
    return proto


_pool = descriptor_pool.Default()
try:
    DESCRIPTOR = _pool.FindFileByName("dedupe/test/orders.proto")
except KeyError:
    DESCRIPTOR = _pool.AddSerializedFile(_file().SerializeToString())

Customer: Any = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name["Customer"])
Order: Any = message_factory.GetMessageClass(DESCRIPTOR.message_types_by_name["Order"])
