"""Where a presigned URL may lead: the one store endpoint a hospital configured.

The hub hands each site presigned URLs, and a site's trainer follows them from inside the
hospital's network. A hostile hub could name any server there (another hospital system, an
exfiltration host), so the hospital's admin names its store endpoint (`store.endpoint` in the
site agent's config) and every URL must lead there: same scheme, host and port, under its path.
Plain http is allowed only when the endpoint itself is http. The site agent refuses a task with
any other URL, and the trainer checks the same rule again before its first request.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import SplitResult, unquote, urlsplit

from deeprad.core.errors import ConfigError, PolicyViolation

DEFAULT_PORTS = {"http": 80, "https": 443}
ENDPOINT_FORM = "http(s)://HOST[:PORT][/PATH]"


@dataclass(frozen=True)
class StoreEndpoint:
    """The store a site's trainers may reach: `scheme://host:port` and a path prefix ending
    in `/`. `text` is the endpoint as configured, for messages and the trainer's environment."""

    text: str
    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str, what: str = "store endpoint") -> StoreEndpoint:
        """An endpoint from its configured form; ConfigError naming `what` when malformed."""
        text = text.strip()
        form = f"{what} {text!r}: expected {ENDPOINT_FORM}"
        parts = _split(text)
        if parts is None or parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(form)
        if parts.username is not None or parts.password is not None:
            raise ConfigError(f"{form}, without a user name or password")
        if parts.query or parts.fragment:
            raise ConfigError(f"{form}, without ?query or #fragment")
        port = _port(parts)
        if port is None or _bad_path(parts.path):
            raise ConfigError(form)
        path = parts.path if parts.path.endswith("/") else parts.path + "/"
        return cls(text=text, scheme=parts.scheme, host=parts.hostname, port=port, path=path)

    def check(self, url: str) -> None:
        """Raise PolicyViolation, saying which rule, unless `url` leads to this endpoint."""
        allows = f"the store endpoint {self.text} this site allows (store.endpoint)"
        parts = _split(url)
        if parts is None or not parts.hostname:
            raise PolicyViolation(f"URL {_shown(url)} is not a URL of {allows}")
        if parts.username is not None or parts.password is not None:
            raise PolicyViolation(f"URL to host {parts.hostname} carries a user name or "
                                  f"password (not repeated here); only plain presigned URLs "
                                  f"of {allows} are followed")
        port = _port(parts)
        where = f"{parts.hostname}:{port}" if port is not None else parts.netloc
        foreign = PolicyViolation(f"URL host {where} is not {allows}; a hub may only send "
                                  "URLs of the store this site's admin configured")
        if parts.hostname != self.host:
            raise foreign
        if parts.scheme != self.scheme:
            plain = (" (plain http is allowed only when store.endpoint is http://)"
                     if parts.scheme == "http" else "")
            raise PolicyViolation(f"URL scheme {parts.scheme}:// to {where} is not that of "
                                  f"{allows}{plain}")
        if port != self.port:
            raise foreign
        if _bad_path(parts.path) or not parts.path.startswith(self.path):
            raise PolicyViolation(f"URL path {_shown(parts.path)} on {where} is outside "
                                  f"{self.path} of {allows}")


def _split(url: str) -> SplitResult | None:
    """`url` split into parts; None when it holds spaces or control characters (which
    servers and proxies may read differently from this parser) or does not parse."""
    if any(ord(c) <= 0x20 or ord(c) == 0x7F or c == "\\" for c in url):
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    return parts if parts.scheme in DEFAULT_PORTS else None


def _port(parts: SplitResult) -> int | None:
    try:
        explicit = parts.port
    except ValueError:
        return None
    return explicit if explicit is not None else DEFAULT_PORTS[parts.scheme]


def _bad_path(path: str) -> bool:
    """Dot segments and encoded separators: a server may resolve them out of the prefix."""
    segments = [unquote(s) for s in path.split("/")]
    return any(s in (".", "..") or "/" in s or "\\" in s for s in segments)


def _shown(text: str, limit: int = 120) -> str:
    """`text` for a message: printable, without a presigned URL's query (its signature)."""
    head = text.split("?", 1)[0]
    head = "".join(c if c.isprintable() else "?" for c in head)
    return repr(head[:limit] + ("…" if len(head) > limit else ""))
