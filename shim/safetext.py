"""Text that came from elsewhere (a registry's error body, a token service's answer, a snapshot's
recorded names) made safe to store and show: control characters (ANSI escapes, newlines that
would forge a line of `thaw events`) replaced, the length capped, and credentials removed.

Applied where remote text enters (shim/registry/transport.py) and again where events are printed
(`thaw events`), so a line written by an older thaw or by hand is shown safely too.
"""

from __future__ import annotations

import re

REMOTE_MAX = 512            # characters of remote text kept in one message
SHOW_MAX = 2000             # characters of one field `thaw events` prints
# C0 and C1 controls, DEL, and the Unicode line/paragraph separators and bidi overrides that
# make a terminal line say something else than its bytes.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
# Authorization values, whatever header or body echoes them: "Basic ...", "Bearer ...", and
# token-like JSON fields.
_CREDENTIAL = re.compile(r"(?i)\b(basic|bearer)\s+[A-Za-z0-9._~+/=-]{4,}"
                         r"|(\"?(?:access_token|refresh_token|token|password|identitytoken|auth)\"?\s*[:=]\s*)"
                         r"\"?[^\s\",}]{4,}\"?")
REDACTED = "[redacted]"


_CONTROL_BUT_LINES = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def printable(text: object, limit: int | None = SHOW_MAX, lines: bool = False) -> str:
    """`text` with every control character shown as `?` (one line, nothing a terminal acts on;
    `lines`: newlines and tabs kept, for an error message of several lines such as a tool's
    output), at most `limit` characters (an ellipsis says it was cut)."""
    s = (_CONTROL_BUT_LINES if lines else _CONTROL).sub("?", str(text))
    return s if limit is None or len(s) <= limit else s[:limit - 1] + "…"


def redact(text: str, secrets: tuple[str, ...] = ()) -> str:
    """`text` without the given secret values (those thaw sent) nor anything shaped like a
    credential (Basic/Bearer values, token or password fields)."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _CREDENTIAL.sub(lambda m: (m.group(2) or m.group(1) + " ") + REDACTED, text)


def remote(text: object, secrets: tuple[str, ...] = (), limit: int = REMOTE_MAX) -> str:
    """Remote text as thaw keeps it: credentials removed, then printable and capped."""
    return printable(redact(str(text), secrets), limit)
