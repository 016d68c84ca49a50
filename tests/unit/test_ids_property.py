"""Property: whatever bytes a producer sends, ID extraction returns a storable ID or
raises the library's own MissingId, for every id_source kind (issue 10, item 3)."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from dedupe_consumer.ids import MAX_ID_BYTES, MissingId, parse_id_source
from dedupe_consumer.replay import Record

SOURCES = ["key", "hash", "header:event-id", "json:/id", "json:/a/0/b~1c"]

# Any code point, lone surrogates included (the default text strategy leaves them out),
# plus the shapes random text rarely reaches: surrogates, multi-byte runs near the limit.
any_text = st.one_of(
    st.text(st.characters(codec=None, exclude_categories=()), max_size=600),
    st.sampled_from(["\ud800", "\udfff", "a\udc80b", "\x00", "a\x1b[2Jb", "\x85"]),
    st.builds(
        lambda char, n: char * n,
        st.sampled_from(["\u20ac", "\U0001f600", "\u00e9", "a"]),
        st.integers(100, 600),
    ),
)
json_scalars = st.one_of(
    any_text,
    st.integers(),
    st.floats(allow_nan=False),
    st.booleans(),
    st.none(),
)


def json_docs() -> st.SearchStrategy[bytes]:
    """JSON that reaches the pointer with hostile leaves, plus raw garbage."""
    leaf = st.recursive(
        json_scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(any_text, inner, max_size=3),
        max_leaves=5,
    )
    doc = st.one_of(
        st.builds(lambda v: {"id": v}, leaf),
        st.builds(lambda v: {"a": [{"b/c": v}]}, leaf),
        st.dictionaries(any_text, leaf, max_size=3),
    )
    return st.one_of(
        st.builds(lambda v: json.dumps({"id": v}).encode(), any_text | st.integers()),
        st.builds(lambda v: json.dumps({"a": [{"b/c": v}]}).encode(), any_text),
        st.builds(
            lambda d, ascii_: json.dumps(d, ensure_ascii=ascii_).encode("utf-8", "surrogatepass"),
            doc,
            st.booleans(),
        ),
        st.binary(max_size=700),
        st.just(b"[" * 5000),  # deep nesting
        st.just(b'{"id": ' + b"9" * 5000 + b"}"),  # past int's digit limit
    )


header_names = st.one_of(st.just("event-id"), any_text)
headers = st.lists(
    st.tuples(header_names, st.one_of(st.none(), st.binary(max_size=700))), max_size=4
)


@settings(max_examples=400, deadline=None)
@given(
    source=st.sampled_from(SOURCES),
    key=st.one_of(st.none(), st.binary(max_size=700)),
    value=st.one_of(st.none(), json_docs()),
    message_headers=headers,
)
def test_extraction_returns_a_storable_id_or_raises_missing_id(
    source: str,
    key: bytes | None,
    value: bytes | None,
    message_headers: list[tuple[str, bytes | None]],
) -> None:
    extract = parse_id_source(source)
    message = Record("t", 0, 0, key, value, list(message_headers), 1)
    try:
        event_id = extract(message)
    except MissingId:
        return
    data = event_id.encode()  # never UnicodeEncodeError
    assert 0 < len(data) <= MAX_ID_BYTES
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in event_id)
