"""JSONSchemaBench data: loading and the fixed, deterministic benchmark sample.

The data folder (see its README.md) holds one JSONL file per subset (``<subset>.jsonl`` or
``<subset>.jsonl.gz``); each line is ``{"unique_id", "subset", "json_schema", "valid",
"invalid", ...}``. The sample keeps only schemas with at least one valid instance, orders them
by the SHA-1 of ``unique_id`` and takes the first N of each subset. Only the standard library is
imported, so tests can reuse this module cheaply.
"""

from __future__ import annotations

import gzip
import hashlib
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

DATA_DIR = Path("/work/shared/data/jsonschemabench")

# In the order of the data README (roughly from simple to large schemas).
SUBSETS: tuple[str, ...] = (
    "Glaiveai2K",
    "Github_trivial",
    "Github_easy",
    "Github_medium",
    "Github_hard",
    "Github_ultra",
    "Snowplow",
    "Kubernetes",
    "WashingtonPost",
    "JsonSchemaStore",
)


class Case(NamedTuple):
    """One sampled schema with its test instances."""

    subset: str
    unique_id: str
    schema: dict[str, Any]
    valid: list[Any]
    invalid: list[Any]


def serialize(instance: Any, schema: dict[str, Any]) -> str:
    """The text a decoder must accept for ``instance``: `fsm.canonical_dumps` (compact JSON,
    object keys in the schema's declared order, undeclared keys after them)."""
    from fsm.json_schema import canonical_dumps

    return canonical_dumps(instance, schema)


def subset_file(subset: str, data_dir: Path = DATA_DIR) -> Path:
    """The JSONL (or gzip-compressed JSONL) file of ``subset``."""
    for name in (f"{subset}.jsonl", f"{subset}.jsonl.gz"):
        path = data_dir / name
        if path.is_file():
            return path
    raise FileNotFoundError(f"No data file for subset {subset!r} in {data_dir}")


def load_subset(subset: str, data_dir: Path = DATA_DIR) -> list[dict[str, Any]]:
    """All records of ``subset``, in file order."""
    path = subset_file(subset, data_dir)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _sort_key(unique_id: str) -> str:
    return hashlib.sha1(unique_id.encode("utf-8")).hexdigest()


def sample(
    per_subset: int = 50,
    subsets: Iterable[str] = SUBSETS,
    data_dir: Path = DATA_DIR,
) -> Iterator[Case]:
    """Yield the fixed sample: per subset, the first ``per_subset`` schemas with a valid
    instance, ordered by SHA-1 of ``unique_id``."""
    for subset in subsets:
        records = [r for r in load_subset(subset, data_dir) if r.get("valid")]
        records.sort(key=lambda r: (_sort_key(r["unique_id"]), r["unique_id"]))
        for r in records[:per_subset]:
            yield Case(subset, r["unique_id"], r["json_schema"], r["valid"], r["invalid"] or [])
