"""Bearer-token authentication in the handshake, before any WebSocket is opened.

    python examples/auth_token.py              # try three clients, then exit
    python examples/auth_token.py --serve 127.0.0.1:8080

``Server(authenticate=hook)`` runs ``hook(request)`` on the upgrade request. What it
returns becomes ``ctx.identity`` for the life of the connection; a falsy result refuses
the upgrade with ``403 Forbidden``; raising ``HandshakeRejected`` picks the status and
headers, here ``401`` with the ``WWW-Authenticate`` challenge of RFC 6750. An exception
of any other kind is logged and answered with 500.

Browsers cannot set headers on a WebSocket: for them, carry the token in the query
string (``request.query_params``) or a cookie, and keep such URLs out of access logs.
"""

from __future__ import annotations

import argparse
import hmac
from typing import Any, Dict, Optional

from wsroute_sync import Client, HandshakeRejected, HTTPRequest, Server

# In a real service: a database or a signed token (JWT) checked here.
TOKENS = {"s3cret-alice": "alice", "s3cret-bob": "bob"}
CHALLENGE = ("WWW-Authenticate", 'Bearer realm="x"')


def authenticate(request: HTTPRequest) -> Optional[str]:
    header = request.headers.get("authorization") or ""
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token:
        raise HandshakeRejected(401, "bearer token required", headers=[CHALLENGE])
    for known, user in TOKENS.items():
        # compare_digest: the time taken does not tell how much of a token was right.
        if hmac.compare_digest(known.encode(), token.strip().encode()):
            return user
    return None  # falsy: 403 Forbidden


server = Server(authenticate=authenticate)


@server.route("whoami")
def whoami(ctx: Any, message: bytes) -> Dict[str, Any]:
    return {"user": ctx.identity}


def tryout() -> None:
    with server.start("127.0.0.1:0"):
        for label, headers in [
            ("no token", {}),
            ("wrong token", {"Authorization": "Bearer guess"}),
            ("alice's token", {"Authorization": "Bearer s3cret-alice"}),
        ]:
            try:
                with Client.connect(server.url, headers=headers, timeout=5) as client:
                    print(f"{label}: connected, whoami ->", client.call_json("whoami"))
            except HandshakeRejected as exc:
                challenge = dict(exc.headers).get("www-authenticate")
                print(f"{label}: refused with HTTP {exc.status} ({exc.reason})"
                      + (f", challenge {challenge}" if challenge else ""))


def serve_until_interrupted() -> None:
    try:
        server.wait_closed()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--serve", metavar="ADDR",
                        help="serve on ADDR (e.g. :8080 or 127.0.0.1:0) until Ctrl-C "
                        "instead of trying three clients")
    args = parser.parse_args()
    if args.serve:
        server.start(args.serve)
        print("serving on", server.url, flush=True)
        print(f"try: wsroute-sync call {server.url} whoami "
              "-H 'Authorization: Bearer s3cret-alice'", flush=True)
        serve_until_interrupted()
    else:
        tryout()


if __name__ == "__main__":
    main()
