"""Seeds: one stable derivation from named parts, one seeded subset."""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from the parts ("|"-joined, sha256), the same in every process and on every machine."""
    digest = hashlib.sha256("|".join(map(str, parts)).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def seeded_subset(items: Sequence, size: int | None, seed: int) -> list:
    """`size` items drawn without replacement with `seed`, kept in their original order (all when None)."""
    if size is None or size >= len(items):
        return list(items)
    return [items[i] for i in sorted(random.Random(seed).sample(range(len(items)), size))]
