"""Who may write decisions from the dashboard.

Bound to a loopback address (the default), the dashboard is as private as the
machine, and anyone who can open it may record decisions. Bound beyond
localhost (``audit dashboard --host 0.0.0.0``), anyone on the network can reach
it, so ``audit dashboard`` warns and sets an access token (the user's
``AUDIT_DASHBOARD_TOKEN``, else a random one printed once on stderr) that the
app asks for before the first write of each browser session.

The token lives only in the server's environment and in the browser session's
server-side state: never in the workspace, the URL or a cookie. It is
compared with :func:`hmac.compare_digest`. An app served beyond localhost with
no token (``streamlit run app.py`` binds every interface by default) is read
only.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from dataclasses import dataclass

__all__ = ["TOKEN_ENV", "WritePolicy", "is_loopback", "new_token", "token_matches", "write_policy"]

TOKEN_ENV = "AUDIT_DASHBOARD_TOKEN"


def is_loopback(host: str | None) -> bool:
    """True when binding ``host`` is reachable from this machine only (127.0.0.0/8, ::1, localhost).

    An empty or missing address means every interface (Streamlit's default);
    any other name is taken as reaching beyond this machine.
    """
    h = (host or "").strip().strip("[]").lower()
    if h == "localhost":
        return True
    try:
        return ipaddress.ip_address(h).is_loopback
    except ValueError:
        return False


def new_token() -> str:
    """A random URL-safe access token (128 bits)."""
    return secrets.token_urlsafe(16)


def token_matches(given: str | None, expected: str) -> bool:
    """Constant-time comparison of an entered token with the expected one (surrounding spaces ignored)."""
    if not given or not expected:
        return False
    return hmac.compare_digest(given.strip().encode("utf-8"), expected.encode("utf-8"))


@dataclass(frozen=True)
class WritePolicy:
    """``mode``: ``open`` (write freely), ``token`` (ask for ``token`` first) or ``closed`` (read only)."""

    mode: str
    token: str | None = None
    address: str = ""


def write_policy(address: str | None, token: str | None) -> WritePolicy:
    """What the app requires before a write, given its bind address and configured token.

    A token, when configured, is always required; without one, a loopback
    bind writes freely and any other bind is read only.
    """
    token = (token or "").strip() or None
    if token:
        return WritePolicy("token", token, address or "")
    return WritePolicy("open" if is_loopback(address) else "closed", None, address or "")
