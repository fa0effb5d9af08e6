"""Autobahn|Testsuite conformance harness for the ``wsroute_sync`` echo server.

The original ``autobahntestsuite`` needs Python 2, so we drive the Autobahn case
files with `kosoku <https://pypi.org/project/kosoku/>`_ 0.1.0, a Rust runner that
imports those case files in-process and plays the fuzzing client.

Modules, in the order data flows:

* ``cases``        which cases run (groups 1-10, 12, 13), how they are chunked,
                   and what counts as a pass. Pure; no I/O.
* ``utf8_vectors`` the intended bytes of the valid UTF-8 vectors that kosoku
                   0.1.0 mangles, derived from code points. Pure.
* ``wirelog``      decodes the client frames kosoku recorded in its wire log, so
                   we can prove which bytes really went on the wire. Pure.
* ``runner``       ``python -m <pkg>.runner``: the only module that imports
                   kosoku. Runs in a subprocess because kosoku puts its own
                   ``case``/``autobahn``/``pkg_resources`` shims at the front
                   of ``sys.path``, which must not leak into the test process.
* ``harness``      starts the server under test and the runner per chunk,
                   each under a timeout, and turns the results into verdicts
                   and a summary.
"""
