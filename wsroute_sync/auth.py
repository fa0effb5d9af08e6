"""Authentication hooks for ``Server(authenticate=...)``, run before the upgrade.

A hook receives the :class:`~wsroute_sync.HTTPRequest` and returns an identity (kept
on ``ctx.identity``), or refuses: a falsy result answers 403, and raising
:class:`~wsroute_sync.HandshakeRejected` picks the status and headers (401 with
``WWW-Authenticate`` asks the client for credentials).
"""

from __future__ import annotations

import base64
import binascii
import hmac
from typing import Callable, Mapping, Optional

from .errors import HandshakeRejected
from .http import HTTPRequest

__all__ = ["basic_auth"]


def basic_auth(
    credentials: Optional[Mapping[str, str]] = None,
    *,
    check: Optional[Callable[[str, str], bool]] = None,
    realm: str = "wsroute_sync",
) -> Callable[[HTTPRequest], str]:
    """HTTP Basic authentication (RFC 7617); the identity is the user name.

    Give either ``credentials`` (``{"user": "password"}``, compared in constant time)
    or ``check(user, password) -> bool``. Requests without valid credentials get 401
    with ``WWW-Authenticate: Basic realm="<realm>", charset="UTF-8"``.
    """
    if (credentials is None) == (check is None):
        raise TypeError("give credentials or check, exactly one")
    if '"' in realm or "\\" in realm:
        raise ValueError("realm must not contain quotes or backslashes")
    challenge = [("WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"')]
    table = dict(credentials or {})

    def verify(user: str, password: str) -> bool:
        if check is not None:
            return bool(check(user, password))
        expected = table.get(user)
        # Compare even for unknown users, so timing does not tell which names exist.
        ok = hmac.compare_digest(
            (expected if expected is not None else "\0" + password).encode(), password.encode()
        )
        return ok and expected is not None

    def authenticate(request: HTTPRequest) -> str:
        header = request.headers.get("authorization")
        if header is None:
            raise HandshakeRejected(401, "authentication required", headers=challenge)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "basic":
            raise HandshakeRejected(401, "use HTTP Basic authentication", headers=challenge)
        try:
            decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
        except (binascii.Error, UnicodeDecodeError):
            raise HandshakeRejected(401, "malformed credentials", headers=challenge) from None
        user, sep, password = decoded.partition(":")
        if not sep or not verify(user, password):
            raise HandshakeRejected(401, "invalid credentials", headers=challenge)
        return user

    return authenticate
