"""MobilityData's GBFS catalogue (``systems.csv``) as ``[[gbfs.systems]]`` settings.

``collector systems import systems.csv`` keeps the rows a country and version filter pick and
writes one TOML entry per system. The name (the ``system`` tag, so it must not change between
imports) comes from the row's ``System ID``: folded to ASCII, lower case, letters, digits and
``_ . -`` only. The few IDs the catalogue lists twice, or that fold to the same name, are told
apart by a short hash of their discovery URL, which stays put between imports. Systems that
need authentication are written apart, commented out, with what they need.
"""

from __future__ import annotations

import csv
import hashlib
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CatalogueError", "Entry", "VersionFilter", "entries", "read", "to_toml"]

# What a system needs in order to be polled, by the catalogue's Authentication Type code.
_AUTH_TYPES = {
    "1": "OAuth 2.0 client credentials",
    "2": "HTTP headers",
}


class CatalogueError(Exception):
    """The file is not a systems.csv, or a filter cannot be read."""


@dataclass(frozen=True)
class Entry:
    name: str
    system_id: str
    title: str  # the catalogue's Name and Location
    country: str
    url: str
    versions: tuple[str, ...]
    auth: str | None  # what it needs, when it needs authentication


def _version_key(version: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in version.split("."))
    except ValueError:
        raise CatalogueError(f"not a GBFS version: {version!r}") from None


class VersionFilter:
    """``">=2.0"``, ``"<3"``, ``"==2.3"``, ``"2.3"`` (equal): a system passes when any of its
    supported versions does."""

    _FORM = re.compile(r"\s*(>=|<=|==|>|<|=)?\s*(\d+(?:\.\d+)*)\s*")

    def __init__(self, text: str) -> None:
        match = self._FORM.fullmatch(text)
        if match is None:
            raise CatalogueError(f"--version {text!r}: expected e.g. >=2.0, <3 or 2.3")
        self.op = match.group(1) or "=="
        self.version = _version_key(match.group(2))

    def passes(self, versions: Iterable[str]) -> bool:
        for version in versions:
            key = _version_key(version)
            width = max(len(key), len(self.version))
            a = key + (0,) * (width - len(key))
            b = self.version + (0,) * (width - len(self.version))
            if {
                ">=": a >= b,
                "<=": a <= b,
                ">": a > b,
                "<": a < b,
                "==": a == b,
                "=": a == b,
            }[self.op]:
                return True
        return False


_COLUMNS = ("Country Code", "Name", "System ID", "Auto-Discovery URL", "Supported Versions")


def read(path: Path) -> list[dict[str, str]]:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError) as exc:
        raise CatalogueError(f"cannot read {path}: {exc}") from None
    if not rows or any(column not in rows[0] for column in _COLUMNS):
        raise CatalogueError(f"{path}: not a GBFS systems.csv (columns {', '.join(_COLUMNS)})")
    return rows


def slug(system_id: str) -> str:
    """A ``system`` tag from a catalogue ID: ``voi_V'Lônes`` -> ``voi_v-lones``."""
    ascii_id = unicodedata.normalize("NFKD", system_id).encode("ascii", "ignore").decode()
    name = re.sub(r"[^a-z0-9_.-]+", "-", ascii_id.lower()).strip("-.")
    return name or "system"


def entries(
    rows: Sequence[dict[str, str]],
    *,
    countries: Iterable[str] = (),
    version: VersionFilter | None = None,
) -> list[Entry]:
    """The rows that pass the filters, named; names are unique and do not depend on the
    filters (a system keeps its name whichever subset is imported)."""
    names = _names(rows)
    wanted = {c.strip().upper() for c in countries if c.strip()}
    out = []
    for row, name in zip(rows, names, strict=True):
        versions = tuple(v.strip() for v in row["Supported Versions"].split(";") if v.strip())
        if wanted and row["Country Code"].strip().upper() not in wanted:
            continue
        if version is not None and not version.passes(versions):
            continue
        out.append(
            Entry(
                name=name,
                system_id=row["System ID"],
                title=", ".join(p for p in (row["Name"].strip(), row.get("Location", "")) if p),
                country=row["Country Code"].strip().upper(),
                url=row["Auto-Discovery URL"].strip(),
                versions=versions,
                auth=_auth(row),
            )
        )
    return out


def _names(rows: Sequence[dict[str, str]]) -> list[str]:
    """One name per row, over the whole catalogue (before filtering): a name shared by several
    rows gets, on each, a hash of its discovery URL."""
    slugs = [slug(row["System ID"]) for row in rows]
    counts: dict[str, int] = {}
    for s in slugs:
        counts[s] = counts.get(s, 0) + 1
    names = []
    for s, row in zip(slugs, rows, strict=True):
        if counts[s] > 1:
            url = row["Auto-Discovery URL"].strip().encode()
            s = f"{s}-{hashlib.blake2b(url, digest_size=3).hexdigest()}"
        names.append(s)
    if len(set(names)) != len(names):  # the same ID and the same URL twice: one system
        seen: set[str] = set()
        unique = []
        for n in names:
            i = 2
            base = n
            while n in seen:
                n, i = f"{base}-{i}", i + 1
            seen.add(n)
            unique.append(n)
        names = unique
    return names


def _auth(row: dict[str, str]) -> str | None:
    kind = (row.get("Authentication Type") or "").strip()
    if not kind:
        return None
    what = _AUTH_TYPES.get(kind, f"authentication type {kind}")
    params = [p.strip() for p in (row.get("Authentication Parameter Name") or "").split("|")]
    params = [p for p in params if p]
    info = (row.get("Authentication Info URL") or "").strip()
    said = what + (f" ({', '.join(params)})" if params else "")
    return said + (f"; how to get them: {info}" if info else "")


def _toml_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(chosen: Sequence[Entry], *, interval_secs: float | None = None) -> str:
    """``[[gbfs.systems]]`` entries, the open systems first; those needing authentication
    after them, commented out, each with what it needs (headers go in ``headers``)."""
    open_systems = [e for e in chosen if e.auth is None]
    closed = [e for e in chosen if e.auth is not None]
    out = [
        f"# {len(open_systems)} systems from the GBFS catalogue"
        + (
            f"; {len(closed)} more need authentication (at the end, commented out)"
            if closed
            else ""
        ),
        "",
    ]
    for e in open_systems:
        out += [
            f"# {e.title} ({e.country}; GBFS {', '.join(e.versions)})",
            *_entry(e, interval_secs),
            "",
        ]
    if closed:
        out += [
            "# Need authentication: add what each needs (e.g. headers = { ... }) and uncomment.",
            "",
        ]
        for e in closed:
            out += [f"# {e.title} ({e.country}): needs {e.auth}"]
            out += [f"# {line}" for line in _entry(e, interval_secs)]
            out += [""]
    return "\n".join(out)


def _entry(e: Entry, interval_secs: float | None) -> list[str]:
    lines = ["[[gbfs.systems]]", f"name = {_toml_string(e.name)}", f"url = {_toml_string(e.url)}"]
    if interval_secs is not None:
        lines.append(f"interval_secs = {interval_secs:g}")
    return lines
