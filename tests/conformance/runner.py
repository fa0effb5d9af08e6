"""kosoku driver, run as a subprocess: ``python -m <package>.runner COMMAND``.

This is the only module that imports kosoku. It runs in its own process
because ``kosoku._caseindex.initialize_shims()`` (which every case import
needs) prepends kosoku's vendored ``case``, ``autobahn`` and ``pkg_resources``
shims to ``sys.path`` and patches ``binascii.b2a_hex``; none of that may leak
into the pytest process. The harness also needs a process it can kill: kosoku
has no closing-handshake timeout, so a server that ignores a Close blocks
``run_fuzzingclient`` forever.

Commands:

``list``
    Print the ids of every case kosoku knows, as a JSON list.
``vectors``
    Print, as JSON, the bytes kosoku would put on the wire for each case of
    6.2.4 and 6.5-6.23, before and after the UTF-8 workaround.
``run --url URL --results-fd FD [--report-dir DIR] PATTERN...``
    Run the matching cases one at a time, writing one JSON object per line to
    file descriptor FD as each event happens (``start``, then ``result``, per
    case), so the harness sees a stalled case at once and, if it has to kill
    us, still knows which case hung and what the others did.

kosoku's Python API (``kosoku.run_fuzzingclient(url, cases, exclude_cases,
concurrency)``) returns a ``CaseResult`` per case, or raises
``kosoku.FailureError`` whose ``results`` holds the same list.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import kosoku
from kosoku import FailureError, run_fuzzingclient
from kosoku._caseindex import initialize_shims

from .cases import case_sort_key, select
from .utf8_vectors import VALID_VECTORS, repaired_payload
from .wirelog import TruncatedWirelog, first_text_message


def _case_id(class_name: str) -> str:
    """``Case6_5_3`` -> ``6.5.3``, the same rule kosoku's index uses."""
    return class_name[len("Case") :].replace("_", ".")


def _case_modules() -> Iterator[Any]:
    initialize_shims()
    cases_dir = Path(kosoku.__file__).resolve().parent / "cases"
    for path in sorted(cases_dir.glob("case*.py")):
        if path.stem != "case":  # the base class module
            yield importlib.import_module(path.stem)


def case_classes() -> dict[str, type]:
    """Every case class kosoku can run, keyed by case id.

    Static modules define ``Case<N>_<M>...``; generator modules (6.5-6.23,
    7.7, 7.9, 9.7, 9.8, 12, 13) define lists of generated classes. kosoku's
    Rust side imports the very same module objects from ``sys.modules``, so
    patching these classes changes what kosoku sends.
    """
    found: dict[str, type] = {}
    for module in _case_modules():
        static = getattr(module, "Case" + module.__name__[len("case") :], None)
        if isinstance(static, type):
            found[_case_id(static.__name__)] = static
        for name, value in vars(module).items():
            if name.startswith("Case") and isinstance(value, list):
                for cls in value:
                    if isinstance(cls, type):
                        found[_case_id(cls.__name__)] = cls
    return dict(sorted(found.items(), key=lambda item: case_sort_key(item[0])))


def _utf8_cases(classes: dict[str, type]) -> dict[str, type]:
    """6.2.4 and the generated 6.5-6.23 cases: the ones with UTF-8 vectors."""
    return {
        cid: cls
        for cid, cls in classes.items()
        if cid == "6.2.4" or (cid.startswith("6.") and case_sort_key(cid)[1] >= 5)
    }


def apply_utf8_workaround(classes: dict[str, type]) -> dict[str, bytes]:
    """Make kosoku send the intended bytes for every valid UTF-8 vector.

    The cases read ``self.PAYLOAD`` both to send and to build the expected
    echo, so replacing the class attribute fixes both. Returns the patched
    case ids with the bytes that must now appear on the wire.
    """
    patched: dict[str, bytes] = {}
    for cid, cls in _utf8_cases(classes).items():
        payload = cls.PAYLOAD  # type: ignore[attr-defined]
        # Invalid vectors are already `bytes` (sent verbatim); only the valid
        # ones are `str`, and all of those must be in our table.
        if isinstance(payload, str):
            if cid not in VALID_VECTORS:
                raise LookupError(f"kosoku case {cid} has a valid UTF-8 vector we do not know")
            cls.PAYLOAD = repaired_payload(cid, payload)  # type: ignore[attr-defined]
            patched[cid] = VALID_VECTORS[cid]
    missing = VALID_VECTORS.keys() - patched.keys()
    if missing:
        raise LookupError(f"kosoku no longer has valid UTF-8 cases {sorted(missing)}")
    return patched


def _wire_payload(payload: str | bytes) -> bytes:
    # What kosoku puts on the wire for a text message: `str` is UTF-8 encoded,
    # `bytes` go out verbatim.
    return payload.encode("utf-8") if isinstance(payload, str) else bytes(payload)


def dump_vectors() -> dict[str, dict[str, Any]]:
    classes = case_classes()
    before = {cid: cls.PAYLOAD for cid, cls in _utf8_cases(classes).items()}  # type: ignore[attr-defined]
    apply_utf8_workaround(classes)
    return {
        cid: {
            "valid": isinstance(payload, str),
            "unpatched": _wire_payload(payload).hex(),
            "patched": _wire_payload(classes[cid].PAYLOAD).hex(),  # type: ignore[attr-defined]
        }
        for cid, payload in before.items()
    }


def _record(result: kosoku._kosoku.CaseResult, intended: bytes | None) -> dict[str, Any]:
    record: dict[str, Any] = {
        "event": "result",
        "id": result.case_id,
        "behavior": result.behavior.value,
        "behaviorClose": result.behavior_close.value,
        "result": result.result,
        "resultClose": result.result_close,
        "remoteCloseCode": result.remote_close_code,
        "remoteCloseReason": result.remote_close_reason,
        "duration": result.duration,
        "wasClean": result.was_clean,
        "wasNotCleanReason": result.was_not_clean_reason,
    }
    if intended is not None:
        wire: dict[str, Any] = {"intended": intended.hex()}
        try:
            sent = first_text_message(result.wirelog)
            wire["sent"] = None if sent is None else sent.hex()
        except TruncatedWirelog as exc:
            wire["sent"], wire["error"] = None, str(exc)
        record["wire"] = wire
    return record


class _Sink:
    """JSON-lines writer that flushes every line: we may be killed any time."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream

    def write(self, record: dict[str, Any]) -> None:
        self._stream.write(json.dumps(record) + "\n")
        self._stream.flush()


async def _run(
    url: str, ids: Sequence[str], intended: dict[str, bytes], sink: _Sink, report_dir: str | None
) -> None:
    results: list[kosoku._kosoku.CaseResult] = []
    for cid in ids:
        sink.write({"event": "start", "id": cid})
        # One call per case: cheap (the index is built once per process) and
        # it lets the harness name the case that hung.
        try:
            got = await run_fuzzingclient(url, [cid])
        except FailureError as failure:
            got = failure.results
        for result in got:
            sink.write(_record(result, intended.get(result.case_id)))
        results.extend(got)
    if report_dir is not None and results:
        # Autobahn-format HTML/JSON report, as `kosoku -o DIR` writes it.
        from kosoku._report import write_reports

        write_reports(results, report_dir)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="conformance.runner")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list")
    commands.add_parser("vectors")
    run = commands.add_parser("run")
    run.add_argument("--url", required=True)
    run.add_argument("--results-fd", required=True, type=int)
    run.add_argument("--report-dir")
    run.add_argument("patterns", nargs="+")
    args = parser.parse_args(argv)

    if args.command == "list":
        print(json.dumps(list(case_classes())))
    elif args.command == "vectors":
        print(json.dumps(dump_vectors()))
    else:
        classes = case_classes()
        intended = apply_utf8_workaround(classes)
        ids = select(classes, args.patterns)
        with open(args.results_fd, "w", encoding="utf-8") as stream:
            asyncio.run(_run(args.url, ids, intended, _Sink(stream), args.report_dir))


if __name__ == "__main__":
    main()
