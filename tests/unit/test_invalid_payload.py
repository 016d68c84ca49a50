"""``id_source = "json:..."`` on a value that is not JSON: an invalid payload, not a missing ID."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from dedupe_consumer.ids import InvalidPayload, MissingId, parse_id_source

from .conftest import Rig, rec

RigFactory = Callable[..., Rig]
JSON_ID = {"id_source": "json:/order/id"}


def test_non_json_is_dead_lettered_as_invalid_payload(rig: RigFactory) -> None:
    r = rig(dedupe=JSON_ID)
    stats = r.engine.process(
        [
            rec(0, None, value=b"not json at all"),
            rec(1, None, value=b'{"order": {}}'),  # valid JSON without the field
            rec(2, None, value=b'{"order": {"id": "o-1"}}'),
        ]
    ).stats
    reasons = [d.letter.reason for d in r.dead.letters]
    assert reasons == ["invalid-payload", "missing-id"]
    assert "not JSON" in r.dead.letters[0].letter.error_message
    assert r.dead.letters[0].letter.error_class == "InvalidPayload"
    assert stats.by_reason == {"invalid-payload": 1, "missing-id": 1}
    assert r.handler.ids == ["o-1"]  # type: ignore[attr-defined]


@pytest.mark.parametrize("value", [b"\xff\xfe", b"{", b"[1, 2", "ü".encode("latin-1")])
def test_the_extractor_raises_the_library_error_with_its_reason(value: bytes) -> None:
    extract = parse_id_source("json:/id")
    with pytest.raises(MissingId) as info:  # the ids.py contract: only the library's error
        extract(rec(0, None, value=value))
    assert isinstance(info.value, InvalidPayload)
    assert info.value.reason == "invalid-payload"
