"""The one auth policy of every front end: bearer tokens (`authorization: Bearer <token>`).

Inference accepts any user or admin token; adapter management only admin tokens. A call without a
token, or with one the server does not know, is UNAUTHENTICATED (401); a valid user token on an admin
method is PERMISSION_DENIED (403): the caller is known, and may not do this. Health checks stay open,
as load balancers and probes expect. Tokens are compared in constant time.
"""

from __future__ import annotations

import hmac

from loraplex_server.api.errors import PermissionDenied, Unauthenticated

BEARER = "Bearer "


def bearer_token(header: str | None) -> str | None:
    """The token of an `authorization` value, or None when it is not a bearer token."""
    if isinstance(header, str) and header.startswith(BEARER):
        return header[len(BEARER):]
    return None


def _matches(token: str | None, allowed: list[str]) -> bool:
    # Compare against every token in constant time, so timing does not reveal a prefix.
    if token is None:
        return False
    given = token.encode("utf-8", "surrogatepass")
    return any(hmac.compare_digest(given, a.encode()) for a in allowed)


class TokenPolicy:
    """Who may call what; `check` raises Unauthenticated or PermissionDenied."""

    def __init__(self, tokens: list[str], admin_tokens: list[str]) -> None:
        self.tokens = list(tokens)
        self.admin_tokens = list(admin_tokens)

    @property
    def enabled(self) -> bool:
        return bool(self.tokens or self.admin_tokens)

    def check(self, token: str | None, admin: bool = False) -> None:
        if not self.enabled:
            return
        if _matches(token, self.admin_tokens):
            return
        user = _matches(token, self.tokens)
        if user and not admin:
            return
        if user:
            raise PermissionDenied("this method needs an admin token; the token sent is a user token")
        reason = "missing" if token is None else "invalid"
        raise Unauthenticated(f"{reason} bearer token; send `authorization: Bearer <token>`")
