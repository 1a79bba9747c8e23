"""The Host-header allow-list: a defence against DNS rebinding.

A web page on any site can make a visitor's browser send requests to `http://127.0.0.1:8000`
by pointing a name it controls at 127.0.0.1 (DNS rebinding); the browser then treats the
answers as that site's own, so an anonymous API on the loopback address would take its
training jobs from any page its user opens. Such requests carry the attacker's name in
`Host`. With IWAE_ALLOWED_HOSTS set, any other Host gets 400 before the app sees the
request; `iwae serve` on a loopback address without a token sets it to `LOOPBACK_HOSTS`
when it is unset (`app.server`).
"""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

LOOPBACK_HOSTS = "localhost,127.0.0.1,[::1]"


def parse_hosts(value: str) -> frozenset[str] | None:
    """Lower-case names from a comma-separated list; None (any host) for `*`."""
    names = frozenset(name.strip().lower() for name in value.split(",") if name.strip())
    return None if "*" in names else names


def host_name(header: str) -> str:
    """The name of a Host header, without its port: `[::1]:8000` -> `[::1]`."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[: header.find("]") + 1]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


class AllowedHostsMiddleware:
    def __init__(self, app: ASGIApp, hosts: frozenset[str]) -> None:
        self.app = app
        self.hosts = hosts

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            if host_name(header) not in self.hosts:
                detail = (
                    f"host {header!r} is not served here (IWAE_ALLOWED_HOSTS: "
                    f"{', '.join(sorted(self.hosts))})"
                )
                await JSONResponse({"detail": detail}, status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)
