"""The intended bytes of the *valid* UTF-8 vectors kosoku 0.1.0 gets wrong.

The defect
----------
Autobahn's case 6.2.4 and its generated cases 6.5.x-6.23.x (Markus Kuhn's
UTF-8 decoder stress test) were written for Python 2, where ``'\\xe2\\x82\\xac'``
is three *bytes*. kosoku's automatic Python 3 port keeps those literals, so they
become ``str`` objects of three code points U+00E2 U+0082 U+00AC. Its runner
then UTF-8-encodes text payloads given as ``str``, and every byte >= 0x80
turns into a two-byte sequence: the Euro sign goes out as ``c3 a2 c2 82 c2 ac``
instead of ``e2 82 ac``. The result is still valid UTF-8, so the cases pass,
but no 2-, 3- or 4-byte sequence, non-character or boundary code point from
the stress test ever reaches the server. (The *invalid* vectors are fine: the
generator turns those into ``bytes`` with ``.encode("latin-1")``.)

The fix
-------
We do not trust kosoku's literals. ``VALID_VECTORS`` lists every valid vector
by case id as the code points it is meant to carry, taken from the stress test
(section numbers in the comments) and Autobahn's case generator; the bytes are
the standard UTF-8 encoding of those code points. ``repaired_payload()``
checks that kosoku's literal is the Latin-1 mojibake of exactly those bytes
(so a reordered or changed kosoku case table is caught, not silently
overwritten) and returns the real ``str``, which kosoku's UTF-8 encoding then
puts on the wire byte for byte.
"""

from __future__ import annotations

__all__ = [
    "KOSMOS",
    "VALID_VECTORS",
    "VectorMismatch",
    "repaired_payload",
]

# "κόσμε", the stress test's section 1 sample: U+03BA U+1F79 U+03C3 U+03BC
# U+03B5 = ce ba | e1 bd b9 | cf 83 | ce bc | ce b5 (one 3-byte sequence).
KOSMOS = "\u03ba\u1f79\u03c3\u03bc\u03b5"


class VectorMismatch(ValueError):
    """kosoku's vector is neither our intended bytes nor their known mojibake."""

    def __init__(self, case_id: str, intended: bytes, found: str | bytes) -> None:
        super().__init__(case_id, intended, found)
        self.case_id = case_id
        self.intended = intended
        self.found = found

    def __str__(self) -> str:
        return (
            f"case {self.case_id}: kosoku's payload {self.found!r} is not the intended "
            f"UTF-8 vector {self.intended.hex(' ')} (nor its Latin-1 mojibake); "
            "the kosoku case table changed, update tests/conformance/utf8_vectors.py"
        )


def _encode(*code_points: int) -> bytes:
    return "".join(map(chr, code_points)).encode("utf-8")


def _numbered(subgroup: str, vectors: dict[int, bytes]) -> dict[str, bytes]:
    return {f"{subgroup}.{n}": payload for n, payload in vectors.items()}


def _kosmos_prefixes() -> dict[int, bytes]:
    # Case 6.6.n sends the first n bytes of KOSMOS; only prefixes that end on
    # a code point boundary are valid (n = 2, 5, 7, 9, 11).
    prefixes: dict[int, bytes] = {}
    encoded = b""
    for char in KOSMOS:
        encoded += char.encode("utf-8")
        prefixes[len(encoded)] = encoded
    return prefixes


def _noncharacters() -> list[bytes]:
    # Stress test 5.3 / Autobahn 6.22: U+FFFE and U+FFFF, then U+nFFFE and
    # U+nFFFF of planes 1-16, in plane order. Non-characters are valid UTF-8
    # (RFC 3629) and a WebSocket endpoint must pass them through.
    planes = [0xFFFE, 0xFFFF]
    planes += [plane << 16 | low for plane in range(1, 17) for low in (0xFFFE, 0xFFFF)]
    return [_encode(cp) for cp in planes]


VALID_VECTORS: dict[str, bytes] = {
    # 6.2.4: KOSMOS in 1-byte fragments, so frames end inside code points.
    "6.2.4": KOSMOS.encode("utf-8"),
    # 6.5 = stress test section 1: some correct UTF-8 text.
    **_numbered(
        "6.5",
        {
            1: b"hello\x24world",
            2: b"hello" + _encode(0xA2) + b"world",
            3: b"hello" + _encode(0x20AC) + b"world",
            4: b"hello" + _encode(0x24B62) + b"world",
            5: KOSMOS.encode("utf-8"),
        },
    ),
    # 6.6: all prefixes of KOSMOS; the valid ones.
    **_numbered("6.6", _kosmos_prefixes()),
    # 6.7 = 2.1: first possible sequence of each length.
    **_numbered("6.7", {1: _encode(0x0), 2: _encode(0x80), 3: _encode(0x800), 4: _encode(0x10000)}),
    # 6.9 = 2.2: last possible sequence of each length (up to U+10FFFF).
    **_numbered(
        "6.9", {1: _encode(0x7F), 2: _encode(0x7FF), 3: _encode(0xFFFF), 4: _encode(0x10FFFF)}
    ),
    # 6.11 = 2.3: other boundary conditions (6.11.5, U+110000, is invalid).
    **_numbered(
        "6.11",
        {1: _encode(0xD7FF), 2: _encode(0xE000), 3: _encode(0xFFFD), 4: _encode(0x10FFFF)},
    ),
    # 6.22 = 5.3: non-character code points.
    **_numbered("6.22", dict(enumerate(_noncharacters(), start=1))),
    # 6.23: the Specials block, U+FFF9-U+FFFF (incl. U+FFFD REPLACEMENT CHARACTER).
    **_numbered("6.23", {n: _encode(0xFFF8 + n) for n in range(1, 8)}),
}


def repaired_payload(case_id: str, payload: str) -> str:
    """The ``str`` kosoku must send for *case_id* so the intended bytes go out.

    kosoku encodes a ``str`` text payload as UTF-8, so the right ``str`` is
    simply the intended bytes decoded. Accept a payload that is already right
    (a fixed kosoku) and the known Latin-1 mojibake; refuse anything else.
    """
    intended = VALID_VECTORS[case_id]
    if payload.encode("utf-8") == intended:
        return payload
    try:
        as_py2_bytes = payload.encode("latin-1")
    except UnicodeEncodeError:
        as_py2_bytes = None
    if as_py2_bytes != intended:
        raise VectorMismatch(case_id, intended, payload)
    return intended.decode("utf-8")
