"""Rubin's own alert packets (``lsst.vN_M.alert``): their schemas, fetched as data at set-up.

Rubin Observatory publishes its alert schemas and sample packets in the PyPI package
``lsst-alert-packet`` (https://github.com/lsst/alert_packet), licensed GPLv3. This project
is MIT, so it ships no file of that package and never imports its code: ``fetch`` (the
command ``ulens rubin fetch-schemas``, run by ``scripts/setup.sh``) downloads the pinned
wheel with pip (hash-checked), extracts only the ``.avsc`` schema files and the sample data
of the versions in :data:`SUPPORTED` into :func:`schema_dir`, and writes ``SOURCE.txt``
naming where they came from. Everything else here reads those files with fastavro.

What the format is, from Rubin's documents:

* The schemas: ``lsst/alert/packet/schema/<major>/<minor>/lsst.v<major>_<minor>.*.avsc``
  of lsst-alert-packet; the alert record names its parts as named types in sibling files
  (``lsst.v11_1.diaSource``, ``diaForcedSource``, ``diaObject``, ``ssSource``,
  ``mpc_orbits``); :func:`load_schema` inlines them into one self-contained schema.
* The wire format: Confluent framing (magic byte 0, 4-byte schema id, Avro body) with
  schema id = major * 100 + minor (702 for 7.2, 1101 for 11.1) and ids immutable, so a
  schema can be cached by id forever: lsst-dm/sample_alert_info,
  ``doc/alert_stream_integration_endpoint.md`` ("Schema Registry"), and DMTN-093, "Design
  of the LSST Alert Distribution System" ("Alert Serialization"; "Management and
  Evolution"). That page calls the id little-endian; Confluent's wire format, and this
  codec, write it big-endian (``schemas.HEADER``).
* Contents: the triggering ``diaSource``, ``prvDiaSources`` (previous detections) and
  ``prvDiaForcedSources`` (forced photometry at the object's position) of the previous 12
  months, and the ``diaObject``: LSE-163, the Data Products Definition Document (what each
  alert contains, "Alerts to DIASources"); fluxes in nJy, ``psfFlux`` measured on the difference image and
  ``scienceFlux`` on the visit image (the schema's own ``doc`` strings).
* Compatibility: ``FORWARD_TRANSITIVE`` within a major version (lsst/alert_packet README);
  :data:`SUPPORTED` is the newest schema and the newest of the previous major.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

import fastavro

PACKAGE = "lsst-alert-packet"
PACKAGE_VERSION = "30.2026.2700"
LICENCE = "GPL-3.0-only (GPLv3)"
PACKAGE_URL = f"https://pypi.org/project/{PACKAGE}/{PACKAGE_VERSION}/"
SOURCE_URL = "https://github.com/lsst/alert_packet"
# sha256 of lsst_alert_packet-30.2026.2700-py3-none-any.whl on PyPI: pip checks it
WHEEL_SHA256 = "ee1992cba0bcd218d6806dd5bbded835d61dbd5506e204202e27ef27b3550a9c"
SUPPORTED: tuple[tuple[int, int], ...] = ((11, 1), (10, 0))
ENV = "ULENS_RUBIN_SCHEMAS"
FETCH_COMMAND = "ulens rubin fetch-schemas"
SAMPLE_FILE = "fakeAlert.avro"
_SCHEMA_IN_WHEEL = re.compile(r"^lsst/alert/packet/schema/(\d+)/(\d+)/"
                              r"(lsst\.v\d+_\d+\.[A-Za-z_]+\.avsc|sample_data/[A-Za-z0-9_.-]+\.(?:avro|json))$")


class RubinSchemaError(ValueError):
    """Rubin's schemas cannot be fetched or read; the message says what failed."""
    exit_code = 3      # `ulens`: bad input or configuration (ulens/cli.py, EXIT_CODES)


class SchemasNotFetched(RubinSchemaError):
    """The schema files are not in :func:`schema_dir`; the message names the command to run."""


def schema_id(major: int, minor: int) -> int:
    """The Confluent schema id of Rubin's schema ``major.minor``: major * 100 + minor."""
    if not (isinstance(major, int) and isinstance(minor, int) and major >= 0 and 0 <= minor < 100):
        raise RubinSchemaError(f"not a schema version: {major!r}.{minor!r}")
    return major * 100 + minor


def parse_version(text: str) -> tuple[int, int]:
    """``"11.1"`` -> (11, 1), one of :data:`SUPPORTED`."""
    m = re.fullmatch(r"(\d+)\.(\d+)", str(text).strip())
    v = (int(m.group(1)), int(m.group(2))) if m else None
    if v not in SUPPORTED:
        raise RubinSchemaError(f"Rubin schema version {text!r} is not supported; choose from "
                               f"{', '.join(f'{a}.{b}' for a, b in SUPPORTED)}")
    return v


def schema_dir() -> Path:
    """Where the fetched files live: env ULENS_RUBIN_SCHEMAS, else
    ``~/.cache/ulens/rubin-schemas/<PACKAGE_VERSION>/``."""
    env = os.environ.get(ENV)
    if env is not None:
        if not env.strip():
            raise RubinSchemaError(f"{ENV} is set but empty: unset it or name a folder")
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ulens" / "rubin-schemas" / PACKAGE_VERSION


def _version_dir(root: Path, major: int, minor: int) -> Path:
    return root / str(major) / str(minor)


def _alert_file(root: Path, major: int, minor: int) -> Path:
    return _version_dir(root, major, minor) / f"lsst.v{major}_{minor}.alert.avsc"


def _complete(root: Path, major: int, minor: int) -> bool:
    return _alert_file(root, major, minor).is_file() and \
        (_version_dir(root, major, minor) / "sample_data" / SAMPLE_FILE).is_file()


def available(root: Optional[Path] = None) -> list[tuple[int, int]]:
    """The supported versions whose schema and sample data are in ``root`` (default
    :func:`schema_dir`), newest first; [] when nothing was fetched."""
    root = schema_dir() if root is None else Path(root)
    if not (root / "SOURCE.txt").is_file():
        return []
    return [v for v in SUPPORTED if _complete(root, *v)]


def _not_fetched(root: Path, what: str) -> SchemasNotFetched:
    return SchemasNotFetched(f"{what} not in {root}: run `{FETCH_COMMAND}` (downloads {PACKAGE}=="
                             f"{PACKAGE_VERSION} from PyPI and keeps its schema files there; "
                             f"env {ENV} names another folder)")


# ---------------------------------------------------------------------------- fetching

def _download(tmp: Path) -> Path:
    """pip-download the pinned wheel into ``tmp`` (hash-checked); return its path."""
    req = tmp / "requirements.txt"
    req.write_text(f"{PACKAGE}=={PACKAGE_VERSION} --hash=sha256:{WHEEL_SHA256}\n")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--require-hashes", "--disable-pip-version-check", "-q", "-d", str(tmp / "dl"),
           "-r", str(req)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise RubinSchemaError(f"cannot run `{' '.join(cmd[:4])} ... {PACKAGE}=={PACKAGE_VERSION}`: "
                               f"{exc}") from None
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-6:])
        raise RubinSchemaError(f"`pip download {PACKAGE}=={PACKAGE_VERSION}` failed (exit "
                               f"{proc.returncode}; is PyPI reachable?):\n{tail}")
    wheels = sorted((tmp / "dl").glob("*.whl"))
    if len(wheels) != 1:
        raise RubinSchemaError(f"`pip download {PACKAGE}=={PACKAGE_VERSION}` gave no single wheel: "
                               f"{[w.name for w in wheels]}")
    return wheels[0]


def _extract(wheel: Path, stage: Path) -> list[str]:
    """Copy the supported versions' schema files and sample data from ``wheel`` to
    ``stage`` (same layout as in the wheel under ``schema/``); return the relative paths."""
    wanted = {f"{a}/{b}" for a, b in SUPPORTED}
    out = []
    try:
        with zipfile.ZipFile(wheel) as z:
            for name in z.namelist():
                m = _SCHEMA_IN_WHEEL.match(name)
                if not m or f"{m.group(1)}/{m.group(2)}" not in wanted:
                    continue
                rel = f"{m.group(1)}/{m.group(2)}/{m.group(3)}"   # built from the match: no '..'
                dest = stage / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(z.read(name))
                out.append(rel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise RubinSchemaError(f"cannot read {wheel.name}: {exc}") from None
    missing = [f"{a}.{b}" for a, b in SUPPORTED if not _complete(stage, a, b)]
    if missing:
        raise RubinSchemaError(f"{wheel.name} has no alert schema or {SAMPLE_FILE} for version(s) "
                               f"{', '.join(missing)}")
    return sorted(out)


def _source_text(files: list[str]) -> str:
    return (f"These files are data from the Python package {PACKAGE} {PACKAGE_VERSION}\n"
            f"({PACKAGE_URL}, source {SOURCE_URL}), licence {LICENCE},\n"
            f"by Rubin Observatory. They were fetched by `{FETCH_COMMAND}` and are not part of\n"
            f"ulens-broker (MIT), which ships none of them and imports none of that package's code.\n"
            f"Wheel sha256: {WHEEL_SHA256}\n\nFiles:\n" + "".join(f"  {f}\n" for f in files))


def fetch(dest: Optional[Path] = None, quiet: bool = False) -> Path:
    """Fetch the schema files and sample data of :data:`SUPPORTED` into ``dest`` (default
    :func:`schema_dir`) unless they are there already; return the folder.

    Downloads the pinned wheel with ``sys.executable -m pip download --no-deps`` into a
    temporary folder, extracts only the schema files and sample data, then moves them in
    place; ``SOURCE.txt`` (package, version, licence, URL) is written last, so a fetch cut
    short is redone next time.
    """
    root = schema_dir() if dest is None else Path(dest).expanduser()
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if available(root) == list(SUPPORTED):
        say(f"rubin: schemas {', '.join(f'{a}.{b}' for a, b in SUPPORTED)} already in {root}")
        return root
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise RubinSchemaError(f"cannot create {root}: {exc}") from None
    say(f"rubin: downloading {PACKAGE}=={PACKAGE_VERSION} ({LICENCE}) from PyPI for its schema files")
    with tempfile.TemporaryDirectory(prefix="ulens-rubin-") as tmp:
        tmp = Path(tmp)
        wheel = _download(tmp)
        stage = Path(tempfile.mkdtemp(prefix=".stage-", dir=root))
        try:
            files = _extract(wheel, stage)
            (root / "SOURCE.txt").unlink(missing_ok=True)
            for a, b in SUPPORTED:
                target = _version_dir(root, a, b)
                if target.exists():
                    shutil.rmtree(target)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(_version_dir(stage, a, b), target)
            tmp_src = root / "SOURCE.txt.tmp"
            tmp_src.write_text(_source_text(files))
            os.replace(tmp_src, root / "SOURCE.txt")
        except OSError as exc:
            raise RubinSchemaError(f"cannot write the schema files into {root}: {exc}") from None
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    say(f"rubin: {len(files)} files of versions {', '.join(f'{a}.{b}' for a, b in SUPPORTED)} in {root}")
    return root


# ---------------------------------------------------------------------------- reading

PRIMITIVES = {"null", "boolean", "int", "long", "float", "double", "bytes", "string"}


def load_schema(major: int, minor: int, root: Optional[Path] = None) -> dict:
    """Rubin's alert schema ``major.minor`` as one self-contained JSON dict: each named type
    the alert refers to (``lsst.vN_M.diaSource``...) is inlined at its first use from its
    sibling file, so a plain ``fastavro.parse_schema`` takes it."""
    if (major, minor) not in SUPPORTED:
        raise RubinSchemaError(f"Rubin schema version {major}.{minor} is not supported; choose from "
                               f"{', '.join(f'{a}.{b}' for a, b in SUPPORTED)}")
    root = schema_dir() if root is None else Path(root)
    folder = _version_dir(root, major, minor)
    if not _alert_file(root, major, minor).is_file():
        raise _not_fetched(root, f"Rubin's alert schema {major}.{minor} is")

    def read(fullname: str) -> dict:
        path = folder / f"{fullname}.avsc"
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RubinSchemaError(f"{path.name} (named type {fullname}) is not in {folder}: "
                                   f"run `{FETCH_COMMAND}` again") from None
        except (OSError, ValueError) as exc:
            raise RubinSchemaError(f"{path}: not a readable schema: {exc}") from None

    defined: set[str] = set()

    def inline(t, ns: str):
        if isinstance(t, str):
            if t in PRIMITIVES:
                return t
            full = t if "." in t else f"{ns}.{t}"
            if full in defined:
                return full
            return inline(read(full), ns)
        if isinstance(t, list):
            return [inline(x, ns) for x in t]
        if isinstance(t, dict):
            out = dict(t)
            kind = t.get("type")
            if kind in ("record", "enum", "fixed"):
                name = t["name"]
                ns2 = t.get("namespace", ns)
                full = name if "." in name else f"{ns2}.{name}"
                defined.add(full)
                if kind == "record":
                    ns3 = full.rsplit(".", 1)[0]
                    out["fields"] = [{**f, "type": inline(f["type"], ns3)} for f in t["fields"]]
                return out
            if kind == "array":
                out["items"] = inline(t["items"], ns)
            elif kind == "map":
                out["values"] = inline(t["values"], ns)
            else:
                out["type"] = inline(kind, ns)
            return out
        raise RubinSchemaError(f"unexpected schema element {t!r} in {folder}")

    return inline(f"lsst.v{major}_{minor}.alert", f"lsst.v{major}_{minor}")


def sample_packets(major: int, minor: int, root: Optional[Path] = None) -> list[dict]:
    """The records of Rubin's sample packet file (``sample_data/fakeAlert.avro``, an Avro
    container file with its writer schema) for version ``major.minor``."""
    root = schema_dir() if root is None else Path(root)
    path = _version_dir(root, major, minor) / "sample_data" / SAMPLE_FILE
    if not path.is_file():
        raise _not_fetched(root, f"Rubin's sample packets {major}.{minor} are")
    with open(path, "rb") as f:
        return list(fastavro.reader(f))


def add_to(codec, root: Optional[Path] = None) -> list[int]:
    """Make every supported version that was fetched known to ``codec``
    (``codec.add_schema(schema_id, schema)``); return the schema ids added."""
    ids = []
    for a, b in available(root):
        sid = schema_id(a, b)
        codec.add_schema(sid, load_schema(a, b, root))
        ids.append(sid)
    return ids


def require(major: int, minor: int, root: Optional[Path] = None) -> None:
    """Raise :class:`SchemasNotFetched` (naming the command to run) unless version
    ``major.minor`` was fetched."""
    root = schema_dir() if root is None else Path(root)
    if (major, minor) not in available(root):
        raise _not_fetched(root, f"Rubin's alert schema {major}.{minor} is")
