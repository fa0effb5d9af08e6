"""Old home of the codec and the handshake, kept only for server.py's import: delete it then.

protocol.py was split (#16): the handshake's decisions are in handshake.py, the codec in
frames.py (outcomes, close codes, unmask, data frames), assembly.py (receiving a message)
and stream.py (MessageStream, PreparedMessage). server.py still reads the two names
below from here; once its import line reads ``from .frames import CLOSE_GOING_AWAY,
Message`` this module goes. Nothing public is exported from it.
"""

from __future__ import annotations

from .frames import CLOSE_GOING_AWAY, Message

__all__ = ["CLOSE_GOING_AWAY", "Message"]
