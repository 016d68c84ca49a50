"""The ``Idempotency-Key`` is injective: two event IDs never share a key.

A receiver dedupes on the key alone, so a collision drops an event. IDs that
cannot travel as they are go as an RFC 8941 byte sequence (``:<base64>:``);
a literal ID never starts with ``:``, so a literal and an encoded key cannot
meet. ``examples/sidecar_target`` decodes the key by the same rule.
"""

from __future__ import annotations

from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from dedupe_consumer.models import Event
from dedupe_consumer.sidecar.headers import event_id_from_key, request_headers
from dedupe_consumer.sidecar.settings import SidecarSettings
from examples.sidecar_target.app import describe

SETTINGS = SidecarSettings.model_validate({"target_url": "http://127.0.0.1:8080/e"})


def key_of(event_id: str) -> bytes:
    event = Event(event_id, "t", 0, 0, None, b"", (), datetime.now(UTC))
    found = [v for k, v in request_headers(event, SETTINGS) if k.lower() == b"idempotency-key"]
    assert len(found) == 1
    return found[0]


def test_the_reported_collision_is_gone() -> None:
    assert key_of(" pay-1") != key_of("IHBheS0x")  # base64 of " pay-1" is IHBheS0x
    assert key_of("IHBheS0x") == b"IHBheS0x"  # a header-safe ID still travels as it is
    assert key_of(" pay-1") == b":IHBheS0x:"


def test_ids_that_look_encoded_are_encoded_themselves() -> None:
    assert key_of(":IHBheS0x:") != key_of(" pay-1")
    assert event_id_from_key(key_of(":IHBheS0x:")) == b":IHBheS0x:"
    assert event_id_from_key(key_of(":")) == b":"


# Characters that matter: base64's alphabet, the marker, spaces, controls, non-ASCII,
# lone surrogates (not UTF-8 at all).
IDS = st.text(alphabet=st.sampled_from("ab+/=: \t\n\x00é€\ud800") | st.characters(), max_size=12)


@given(IDS, IDS)
def test_keys_are_injective(one: str, two: str) -> None:
    assert (key_of(one) == key_of(two)) == (one == two)


@given(IDS)
def test_keys_are_header_safe_and_decode_to_the_id(event_id: str) -> None:
    key = key_of(event_id)
    assert key == key.strip() and all(0x20 <= b != 0x7F for b in key)  # no CTLs, no edge space
    raw = event_id.encode("utf-8", "surrogatepass")
    assert event_id_from_key(key) == raw
    # The example receiver decodes it the same way.
    entry = describe([("Idempotency-Key", key)], b"")
    assert entry["idempotency_key"] == key.decode("latin-1")
    decoded = entry["event_id"]
    if isinstance(decoded, dict):
        import base64

        assert base64.b64decode(decoded["base64"]) == raw
    else:
        assert decoded.encode() == raw
