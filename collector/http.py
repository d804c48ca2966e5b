"""HTTP GET for sources: timeouts, a body size cap, conditional requests, classified failures."""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import requests

from collector import __version__
from collector.retry import Failure, kind_of_status, parse_retry_after

USER_AGENT = f"livestack-collector/{__version__}"
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Validators:
    """What the server said last time, for ``If-None-Match`` / ``If-Modified-Since``."""

    etag: str | None = None
    last_modified: str | None = None


@dataclass(frozen=True)
class Response:
    body: bytes | None  # None when the server answered 304 Not Modified
    validators: Validators


def redact_url(url: str) -> str:
    """The URL without query string or credentials: feeds put API keys there."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class Fetcher:
    """One keep-alive session for one source. Not shared between threads."""

    def __init__(
        self,
        *,
        headers: Mapping[str, str] | None = None,
        timeout_secs: float = 10.0,
        max_body_bytes: int = 32 * 1024 * 1024,
        verify_tls: bool = True,
    ) -> None:
        self._session = requests.Session()
        self._session.headers["User-Agent"] = USER_AGENT
        self._session.headers["Accept"] = "application/json"
        self._session.headers.update(headers or {})
        self._session.verify = verify_tls
        self._timeout_secs = timeout_secs
        self._max_body_bytes = max_body_bytes

    def close(self) -> None:
        self._session.close()

    def get(self, url: str, validators: Validators | None = None) -> Response:
        """GET ``url``; raises Failure for anything but 200 or 304."""
        conditional = {}
        if validators is not None:
            if validators.etag:
                conditional["If-None-Match"] = validators.etag
            if validators.last_modified:
                conditional["If-Modified-Since"] = validators.last_modified
        where = redact_url(url)
        # The read timeout applies per socket read, so a server trickling bytes could hold a
        # poll forever; the deadline bounds the whole response.
        deadline = time.monotonic() + self._timeout_secs
        try:
            with self._session.get(
                url, headers=conditional, timeout=self._timeout_secs, stream=True
            ) as resp:
                if resp.status_code == 304:
                    return Response(None, validators or Validators())
                if resp.status_code != 200:
                    snippet = resp.raw.read(200, decode_content=True) or b""
                    raise Failure(
                        kind_of_status(resp.status_code),
                        f"HTTP {resp.status_code} from {where}: "
                        f"{snippet.decode('utf-8', 'replace').strip()[:200]}",
                        status=resp.status_code,
                        retry_after_secs=parse_retry_after(
                            resp.headers.get("Retry-After"), time.time()
                        ),
                    )
                declared = resp.headers.get("Content-Length")
                if declared and declared.isdigit() and int(declared) > self._max_body_bytes:
                    raise Failure(
                        "too_large",
                        f"{where} declares {declared} bytes, over max_body_bytes "
                        f"{self._max_body_bytes}",
                    )
                body = bytearray()
                for chunk in resp.iter_content(_CHUNK):
                    body += chunk
                    if len(body) > self._max_body_bytes:
                        raise Failure(
                            "too_large", f"{where} sent over max_body_bytes {self._max_body_bytes}"
                        )
                    if time.monotonic() > deadline:
                        raise Failure(
                            "timeout", f"{where} took over {self._timeout_secs:g}s to send its body"
                        )
                return Response(
                    bytes(body),
                    Validators(resp.headers.get("ETag"), resp.headers.get("Last-Modified")),
                )
        except requests.Timeout as exc:
            raise Failure("timeout", f"{where} timed out after {self._timeout_secs:g}s") from exc
        except requests.ConnectionError as exc:
            raise Failure("connection", f"{where}: {_reason(exc)}") from exc
        except requests.RequestException as exc:
            raise Failure("connection", f"{where}: {type(exc).__name__}") from exc


def _reason(exc: Exception) -> str:
    # requests nests the useful part (refused, DNS, TLS) several exceptions deep.
    inner: BaseException | None = exc
    while inner is not None and inner.__context__ is not None and not isinstance(inner, OSError):
        inner = inner.__context__
    text = str(inner or exc)
    return text.split(": ", 1)[-1][:200]
