"""Which collector replica polls which system: rendezvous (highest random weight) hashing.

Replica K of N polls the systems whose name scores highest for K among 1..N. Every name has
exactly one owner (no overlap, no gap), the score depends on nothing but the name and the
replica number (stable across restarts, machines and Python versions: blake2b, not
``hash()``), and going from N to N+1 replicas moves only the systems that replica N+1 now
wins: about 1/(N+1) of them, each from its old owner to the new one, none between the others.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

__all__ = ["Shard", "owner"]


def _score(name: str, replica: int) -> int:
    digest = hashlib.blake2b(f"{replica}\0{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest)


def owner(name: str, replicas: int) -> int:
    """The replica (1..replicas) that polls ``name``."""
    return max(range(1, replicas + 1), key=lambda k: _score(name, k))


@dataclass(frozen=True)
class Shard:
    index: int  # 1-based: replica K of N
    count: int

    @classmethod
    def parse(cls, text: str) -> Shard:
        """``"K/N"`` with 1 <= K <= N; raises ValueError saying what is wrong."""
        match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
        if match is None:
            raise ValueError(f"shard {text!r}: expected K/N, e.g. 2/3 (replica 2 of 3)")
        index, count = int(match.group(1)), int(match.group(2))
        if not 1 <= index <= count:
            raise ValueError(f"shard {text!r}: K must be from 1 to N")
        return cls(index, count)

    def owns(self, name: str) -> bool:
        return self.count == 1 or owner(name, self.count) == self.index

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"
