"""Protobuf messages for the tests (built from descriptors: no protoc needed)."""
