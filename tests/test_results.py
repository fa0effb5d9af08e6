"""Handler results and pushes that JSON cannot carry: never invalid JSON on the wire."""

from __future__ import annotations

import json
import math
from typing import Any, List

import pytest
from websockets.sync.client import connect

from conftest import TIMEOUT, make_server, running
from wsroute_sync.routing import as_message, encode_result

NOT_JSON = [float("inf"), float("-inf"), float("nan"), {"x": [1, {"y": float("inf")}]}]


@pytest.mark.parametrize("value", NOT_JSON, ids=repr)
def test_encode_refuses_what_json_cannot_carry(value: Any) -> None:
    with pytest.raises(ValueError):
        encode_result(value, True)
    with pytest.raises(ValueError):
        as_message(value)


def test_a_result_json_cannot_carry_gets_bad_result() -> None:
    server = make_server()
    seen: List[str] = []

    @server.route("inf")
    def inf(ctx: Any, message: bytes) -> Any:
        return {"x": math.inf}

    @server.route("push")
    def push(ctx: Any, message: bytes) -> str:
        try:
            ctx.send({"x": math.nan})
        except ValueError as exc:
            seen.append(str(exc))
        return "pushed"

    with running(server):
        with connect(server.url, open_timeout=TIMEOUT) as ws:
            ws.send('{"Route":"inf"}')
            reply = ws.recv(timeout=TIMEOUT)
            assert json.loads(reply) == {"code": 1, "msg": "internal error", "data": None}
            ws.send('{"Route":"push"}')
            assert ws.recv(timeout=TIMEOUT) == "pushed"  # nothing invalid came before it
            ws.send('{"Route":"echo","Params":1}')
            assert ws.recv(timeout=TIMEOUT) == "1"
    assert len(seen) == 1 and "not JSON compliant" in seen[0]
    assert server.stats()["errors"].get("bad_result") == 1
