"""Option values and output places of the jobs, checked before any heavy import or write.

Why: bad input must end as one ``error:`` line with nothing written, in
bounded time. Every check here needs only the standard library and numpy, so the thin
entry points run them before dask, xarray or the data are touched, and
``SweepConfig`` repeats the value checks so that the library refuses the same
values. The output checks are the rule for ``--overwrite``: only a store that
kmclust itself wrote as results is ever replaced — never the input data, a
plain directory, a file, or the working directory or one of its parents.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kmclust.errors import ConfigError
from kmclust.lloyd.init import INITS  # numpy only
from kmclust.lloyd.stopping import RULE_VERSION
from kmclust.location import Location, locate
from kmclust.sweep.schema import RESULTS_MARK  # numpy only

#: seeds are int64 coordinates of the results store
MAX_SEED = 2**63 - 1
#: iteration counts and sizes are stored as int32
MAX_INT32 = 2**31 - 1
#: values on one grid axis: a bound that keeps a typo like 1:1000000000 from building a huge list
MAX_AXIS = 100_000
#: the stopping rule of a stored config that predates the rule's version
FIRST_RULE = 1
#: training rows the silhouette is computed on (0: none); a stored config without it used this
SILHOUETTE_SAMPLE = 2000

#: (k index, init index, seed index) of a cell of the grid
Cell = tuple[int, int, int]


def _whole(value: object) -> bool:
    """A whole number (Python or numpy integer), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: int, lo: int = 0, hi: int = MAX_INT32) -> int:
    """``value`` if it is an int in [lo, hi], else ConfigError naming the option."""
    if not _whole(value) or not lo <= value <= hi:
        raise ConfigError(f"{name} {value!r}: expected a whole number from {lo} to {hi}")
    return value


def number(name: str, value: float, lo: float = 0.0, *, above: bool = False) -> float:
    """``value`` if finite and ≥ lo (> lo with ``above``), else ConfigError naming the option."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < lo or (above and value == lo):
        raise ConfigError(
            f"{name} {value!r}: expected a finite number {'>' if above else '≥'} {lo:g}"
        )
    return float(value)


def parse_ks(text: str) -> tuple[int, ...]:
    """``"5:20"`` (inclusive range) or ``"5,10,20"``; ConfigError on anything else."""
    try:
        if ":" in text:
            lo, hi = (int(p) for p in text.split(":"))
            if lo > hi:
                raise ConfigError(f"--k {text}: empty range (start {lo} > end {hi})")
            if hi - lo + 1 > MAX_AXIS:
                raise ConfigError(f"--k {text}: {hi - lo + 1:,} values; at most {MAX_AXIS:,}")
            ks = tuple(range(lo, hi + 1))
        else:
            ks = tuple(int(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"--k {text!r}: expected a range like 5:20 or a list like 5,10,20"
        ) from None
    return tuple(sorted(check_ks(ks, text)))


def check_ks(ks: tuple[int, ...], text: str | None = None) -> tuple[int, ...]:
    """Distinct whole k values from 1 to 2**31 - 1."""
    text = text if text is not None else ",".join(map(str, ks))
    if not ks or any(not _whole(k) or k < 1 for k in ks):
        raise ConfigError(f"--k {text}: every k must be a whole number of at least 1")
    if max(ks) > MAX_INT32:
        raise ConfigError(f"--k {text}: k must be at most {MAX_INT32}")
    if len(set(ks)) != len(ks):
        raise ConfigError(f"--k {text}: repeated values")
    return ks


def parse_inits(text: str) -> tuple[str, ...]:
    """``"random,data"``: known, distinct init names in the order given."""
    return check_inits(tuple(p.strip() for p in text.split(",") if p.strip()), text)


def check_inits(inits: tuple[str, ...], text: str | None = None) -> tuple[str, ...]:
    """Known, distinct init names."""
    text = text if text is not None else ",".join(inits)
    bad = [i for i in inits if i not in INITS]
    if bad or not inits:
        raise ConfigError(
            f"--init: unknown initialisation {', '.join(map(str, bad)) or repr(text)}; "
            f"choose from {', '.join(INITS)}"
        )
    if len(set(inits)) != len(inits):
        raise ConfigError(f"--init {text}: repeated values")
    return inits


def parse_seeds(text: str) -> tuple[int, ...]:
    """``"10"`` means seeds 0…9; ``"3,7,11"`` lists them."""
    try:
        if "," in text:
            seeds = tuple(int(p) for p in text.split(","))
        else:
            count = int(text)
            if count > MAX_AXIS:
                raise ConfigError(f"--seeds {text}: at most {MAX_AXIS:,} seeds")
            seeds = tuple(range(count))
    except ValueError:
        raise ConfigError(
            f"--seeds {text!r}: expected a count like 10 or a list like 0,1,2"
        ) from None
    return check_seeds(seeds, text)


def check_seeds(seeds: tuple[int, ...], text: str | None = None) -> tuple[int, ...]:
    """At least one seed; distinct whole numbers from 0 to 2**63 - 1."""
    text = text if text is not None else ",".join(map(str, seeds))
    if not seeds or any(not _whole(s) or s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: need at least one distinct non-negative seed")
    if max(seeds) > MAX_SEED:
        raise ConfigError(f"--seeds {text}: a seed must be at most {MAX_SEED}")
    return seeds


@dataclass(frozen=True)
class SweepConfig:
    """Everything that determines a sweep's numbers (``out`` and scheduler do not)."""

    dataset: str = "mnist-subset"
    ks: tuple[int, ...] = tuple(range(5, 21))
    inits: tuple[str, ...] = ("random", "data")
    seeds: tuple[int, ...] = tuple(range(10))
    train_per_class: int | None = 100  # None: the store's own train split
    data_seed: int = 0
    tol: float = 1e-6
    max_iter: int = 100
    chunk_rows: int | None = None  # None: the store's chunking
    silhouette_sample: int = SILHOUETTE_SAMPLE  # seeded sample of training rows; 0: no silhouette

    def __post_init__(self) -> None:
        """Refuse values no sweep can run (the CLI checks the same values before any import)."""
        check_ks(self.ks)
        check_inits(self.inits)
        check_seeds(self.seeds)
        if self.train_per_class is not None:
            integer("--train-per-class", self.train_per_class, 1)
        integer("--data-seed", self.data_seed, 0, MAX_SEED)
        number("--tol", self.tol)
        integer("--max-iter", self.max_iter, 1)
        if self.chunk_rows is not None:
            integer("--chunk-rows", self.chunk_rows, 1)
        integer("--silhouette-sample", self.silhouette_sample)

    def identity(self) -> dict:
        """The JSON-able fields a resumed store must match, with the stopping rule's version."""
        d = dataclasses.asdict(self)
        d = {key: list(v) if isinstance(v, tuple) else v for key, v in d.items()}
        return d | {"rule_version": RULE_VERSION}

    def differences(self, stored: dict) -> list[str]:
        """The identity keys where ``stored`` (a store's config) differs from this config.

        A stored config without ``rule_version`` predates it: its rule was the first; one
        without ``silhouette_sample`` predates the silhouette: its cells get the default.
        """
        theirs = {"rule_version": FIRST_RULE, "silhouette_sample": SILHOUETTE_SAMPLE} | stored
        mine = self.identity()
        return sorted(key for key in set(theirs) | set(mine) if theirs.get(key) != mine.get(key))

    def cell_name(self, cell: Cell) -> str:
        """``k=5 init=data seed=0``: a cell as the job reports it."""
        ki, ii, si = cell
        return f"k={self.ks[ki]} init={self.inits[ii]} seed={self.seeds[si]}"

    @property
    def grid(self) -> tuple[int, int, int]:
        """The number of k values, inits and seeds."""
        return len(self.ks), len(self.inits), len(self.seeds)


def grid_size(config: SweepConfig) -> int:
    """Number of cells of the grid."""
    return math.prod(config.grid)


def _attrs(path: Path) -> dict:
    """The group attributes of a zarr store (v3 ``zarr.json`` or v2 ``.zattrs``), or {}."""
    for name, key in (("zarr.json", "attributes"), (".zattrs", None)):
        try:
            doc = json.loads((path / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        attrs = doc.get(key, {}) if key else doc
        return attrs if isinstance(attrs, dict) else {}
    return {}


def is_results_store(path: Path) -> bool:
    """Whether ``path`` is a results store that kmclust wrote (recognised by its attributes).

    Stores written before the ``kmclust_results`` mark carry the sweep's
    config and the kmclust version among their package versions.
    """
    return results_attrs(_attrs(path))


def results_attrs(attrs: dict) -> bool:
    """Whether a store's root attributes are those of a kmclust results store."""
    if RESULTS_MARK in attrs:
        return True
    try:
        return "kmclust" in json.loads(attrs.get("versions", "{}")) and "config" in attrs
    except (TypeError, ValueError):
        return False


def _within(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` or lies inside it."""
    return a == b or b in a.parents


def check_out(
    out: str | Path | Location,
    *,
    inputs: tuple[str | Path | Location, ...] = (),
    replace: bool = False,
    resume: bool = False,
    storage_options: dict | None = None,
) -> Path | Location:
    """The results store ``out`` (a path, or an fsspec URL as a Location), refused unless it is
    safe to create, resume or replace.

    Creating needs a place where a directory can be made; resuming or
    replacing needs an existing kmclust results store. ``inputs`` (the data
    store) may neither be ``out`` nor lie inside it or contain it.
    """
    if not str(out).strip():
        raise ConfigError("--out is empty: name a results store such as results/NAME.zarr")
    where = locate(out, storage_options)
    if not where.is_local:
        return _check_out_url(where, inputs, replace=replace, resume=resume)
    path = Path(out).expanduser() if not isinstance(out, Location) else where.path
    real = path.resolve()
    cwd = Path.cwd().resolve()
    if _within(cwd, real):
        raise ConfigError(
            f"--out {out} is the working directory or one of its parents; "
            "refusing to use it as a results store"
        )
    for given in inputs:
        if not locate(str(given)).is_local:
            continue  # a data store at a URL cannot overlap a local --out
        other = Path(str(given)).expanduser().resolve()
        if _within(real, other) or _within(other, real):
            raise ConfigError(
                f"--out {out} is the input data store {given} or overlaps it; choose another --out"
            )
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {out} is a file, not a results store")
    if path.exists():
        if not is_results_store(path):
            raise ConfigError(
                f"--out {out} exists and is not a kmclust results store; "
                "refusing to replace or resume it (choose another --out)"
            )
        if not (replace or resume):
            raise ConfigError(
                f"results store {out} exists: use --resume to complete it "
                "or --overwrite to start again"
            )
    _check_writable(path, str(out))
    return path


def _check_out_url(
    where: Location, inputs: tuple[str | Path | Location, ...], *, replace: bool, resume: bool
) -> Location:
    """check_out for a results store on object storage (kmclust.sweep.remote_results)."""
    from kmclust.sweep import remote_results

    url = where.url.rstrip("/")
    for given in inputs:
        other = str(given).rstrip("/")
        if url == other or url.startswith(other + "/") or other.startswith(url + "/"):
            raise ConfigError(
                f"--out {where} is the input data store {given} or overlaps it; "
                "choose another --out"
            )
    found = remote_results.state(where, results_attrs)
    if found == "other":
        raise ConfigError(
            f"--out {where} exists and is not a kmclust results store; "
            "refusing to replace or resume it (choose another --out)"
        )
    if found == "incomplete" and not replace:
        raise ConfigError(
            f"--out {where} is an incomplete store (no root zarr.json: a cut upload?); "
            "use --overwrite to replace it"
        )
    if found in ("results", "replacing") and not (replace or resume):
        raise ConfigError(
            f"results store {where} exists: use --resume to complete it "
            "or --overwrite to start again"
        )
    return where


def _check_writable(path: Path, given: str) -> None:
    """ConfigError unless a directory can be made in the nearest existing ancestor of ``path``."""
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"--out {given}: {parent} is a file, not a directory")
    try:  # a real probe: permission bits do not tell root about read-only file systems
        os.rmdir(tempfile.mkdtemp(prefix=".kmclust-probe-", dir=parent))
    except OSError as exc:
        raise ConfigError(
            f"--out {given}: cannot write in {parent} ({exc.strerror or exc})"
        ) from None
