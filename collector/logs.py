"""One log line per event, as ``key=value`` fields: ``event=poll source=oslo stations=262``."""

from __future__ import annotations

import logging
import re
import sys
import time

_RESERVED = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None)))


def _quote(value: object) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\n\t'):
        text = '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


# Feeds put API keys in query strings and databases take tokens in headers; our own events
# redact them where they are made, but third-party loggers (urllib3 at DEBUG prints every
# request line) do not, so every line is redacted once more on its way out.
_SECRETS = (
    (re.compile(r"\?[^\s\"']+"), "?<redacted>"),
    (re.compile(r"\b(Token|Bearer|Basic)\s+[^\s\"',}]+", re.IGNORECASE), r"\1 <redacted>"),
    (
        re.compile(
            r"\b(password|passwd|token|api_?key|secret)([\"']?\s*[=:]\s*[\"']?)[^\s\"',&}]+", re.I
        ),
        r"\1\2<redacted>",
    ),
)


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class KeyValueFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        parts = [f"{stamp}.{int(record.msecs):03d}Z", f"level={record.levelname.lower()}"]
        parts.append(f"event={_quote(record.getMessage())}")
        for key, value in record.__dict__.items():
            if key not in _RESERVED and not key.startswith("_") and value is not None:
                parts.append(f"{key}={_quote(value)}")
        if record.exc_info:
            parts.append(f"traceback={_quote(self.formatException(record.exc_info))}")
        return " ".join(parts)


def configure(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(KeyValueFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # APScheduler logs every run at INFO, and every skipped run of a busy job at WARNING: our
    # own poll lines and the schedule counters say more, once.
    logging.getLogger("apscheduler").setLevel(logging.ERROR)


def event(logger: logging.Logger, level: int, name: str, **fields: object) -> None:
    # A field named like a LogRecord attribute would make logging raise, in an error path.
    safe = {
        (f"{k}_" if k in _RESERVED or k in ("message", "asctime") else k): v
        for k, v in fields.items()
    }
    logger.log(level, name, extra=safe)
