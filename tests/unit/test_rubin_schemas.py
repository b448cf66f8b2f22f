"""schemas.rubin: fetching Rubin's schema files as data (a fake wheel and a fake pip here),
reading them (inlined named types, sample packets), and adding them to the codec."""
from __future__ import annotations

import io
import json
import struct
import sys
import zipfile
from pathlib import Path

import fastavro
import pytest

import schemas
from schemas import rubin
from tests.helpers import rubin_schemas


def test_schema_ids_and_versions():
    assert rubin.schema_id(11, 1) == 1101 and rubin.schema_id(10, 0) == 1000
    assert rubin.SUPPORTED == ((11, 1), (10, 0))
    assert rubin.parse_version("11.1") == (11, 1) and rubin.parse_version(" 10.0") == (10, 0)
    for bad in ("9.0", "11", "eleven", "11.1.0"):
        with pytest.raises(rubin.RubinSchemaError, match="not supported"):
            rubin.parse_version(bad)
    with pytest.raises(rubin.RubinSchemaError):
        rubin.schema_id(11, 100)


def test_schema_dir_default_and_env(monkeypatch, tmp_path):
    monkeypatch.delenv(rubin.ENV, raising=False)
    assert rubin.schema_dir() == Path.home() / ".cache/ulens/rubin-schemas" / rubin.PACKAGE_VERSION
    monkeypatch.setenv(rubin.ENV, str(tmp_path))
    assert rubin.schema_dir() == tmp_path
    monkeypatch.setenv(rubin.ENV, " ")
    with pytest.raises(rubin.RubinSchemaError, match="set but empty"):
        rubin.schema_dir()


# ---------------------------------------------------------------------------- fetch (no network)

def _record(ns, name, fields):
    return {"type": "record", "namespace": ns, "name": name, "doc": "d", "fields": fields}


def _fake_wheel(path: Path, versions=((11, 1), (10, 0), (9, 0))) -> Path:
    """A wheel shaped like lsst-alert-packet's: code, schemas of several versions, samples."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("lsst/alert/packet/__init__.py", "# GPL code: must not be extracted\n")
        z.writestr("lsst/alert/packet/schema/latest.txt", "11.1\n")
        for a, b in versions:
            ns = f"lsst.v{a}_{b}"
            base = f"lsst/alert/packet/schema/{a}/{b}/"
            alert = _record(ns, "alert", [
                {"name": "diaSourceId", "type": "long"},
                {"name": "diaSource", "type": f"{ns}.diaSource"},
                {"name": "prvDiaSources", "type": ["null", {"type": "array", "items": f"{ns}.diaSource"}],
                 "default": None}])
            src = _record(ns, "diaSource", [{"name": "diaSourceId", "type": "long"},
                                            {"name": "psfFlux", "type": ["null", "float"], "default": None}])
            z.writestr(base + f"{ns}.alert.avsc", json.dumps(alert))
            z.writestr(base + f"{ns}.diaSource.avsc", json.dumps(src))
            z.writestr(base + "sample_data/generate.py", "# code: not extracted\n")
            z.writestr(base + "sample_data/alert.json", "{}")
            buf = io.BytesIO()
            fastavro.writer(buf, fastavro.parse_schema({**alert, "fields": [
                alert["fields"][0], {**alert["fields"][1], "type": src}, alert["fields"][2]]}),
                [{"diaSourceId": 7, "diaSource": {"diaSourceId": 7, "psfFlux": 1.5}, "prvDiaSources": []}])
            z.writestr(base + "sample_data/fakeAlert.avro", buf.getvalue())
    return path


@pytest.fixture
def fake_pip(monkeypatch, tmp_path):
    """rubin._download replaced by a copy of a fake wheel; counts the downloads."""
    calls = []
    wheel = _fake_wheel(tmp_path / "lsst_alert_packet-30.2026.2700-py3-none-any.whl")

    def download(tmp):
        calls.append(tmp)
        (tmp / "dl").mkdir()
        target = tmp / "dl" / wheel.name
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(rubin, "_download", download)
    return calls


def test_fetch_extracts_only_the_supported_schemas_and_samples(fake_pip, tmp_path):
    dest = tmp_path / "cache"
    assert rubin.available(dest) == []
    assert rubin.fetch(dest, quiet=True) == dest
    files = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert files == ["10/0/lsst.v10_0.alert.avsc", "10/0/lsst.v10_0.diaSource.avsc",
                     "10/0/sample_data/alert.json", "10/0/sample_data/fakeAlert.avro",
                     "11/1/lsst.v11_1.alert.avsc", "11/1/lsst.v11_1.diaSource.avsc",
                     "11/1/sample_data/alert.json", "11/1/sample_data/fakeAlert.avro", "SOURCE.txt"]
    source = (dest / "SOURCE.txt").read_text()
    for word in ("lsst-alert-packet", rubin.PACKAGE_VERSION, "GPL", rubin.PACKAGE_URL, "MIT"):
        assert word in source
    assert rubin.available(dest) == [(11, 1), (10, 0)]
    # idempotent: nothing downloaded the second time
    rubin.fetch(dest, quiet=True)
    assert len(fake_pip) == 1
    # a fetch cut short (no SOURCE.txt) is redone
    (dest / "SOURCE.txt").unlink()
    assert rubin.available(dest) == []
    rubin.fetch(dest, quiet=True)
    assert len(fake_pip) == 2 and rubin.available(dest) == [(11, 1), (10, 0)]


def test_load_schema_inlines_named_types_and_add_to_registers_them(fake_pip, tmp_path):
    dest = rubin.fetch(tmp_path / "c", quiet=True)
    s = rubin.load_schema(11, 1, dest)
    assert s["fields"][1]["type"]["name"] == "diaSource"                  # inlined at first use
    assert s["fields"][2]["type"][1]["items"] == "lsst.v11_1.diaSource"   # a name after that
    parsed = fastavro.parse_schema(s)                                      # no other file needed
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parsed, rubin.sample_packets(11, 1, dest)[0])
    codec = schemas.Codec()
    assert rubin.add_to(codec, dest) == [1101, 1000]
    data = b"\x00" + struct.pack(">I", 1101) + buf.getvalue()
    assert codec.decode_kinds(data, "rubin") == ("rubin", rubin.sample_packets(11, 1, dest)[0])


def test_pip_failure_names_what_failed(monkeypatch, tmp_path):
    class Done:
        returncode, stdout = 1, ""
        stderr = "ERROR: Could not find a version that satisfies the requirement lsst-alert-packet"

    monkeypatch.setattr(rubin.subprocess, "run", lambda cmd, **kw: Done())
    with pytest.raises(rubin.RubinSchemaError) as err:
        rubin.fetch(tmp_path / "c", quiet=True)
    msg = str(err.value)
    assert "pip download lsst-alert-packet==30.2026.2700" in msg and "exit 1" in msg
    assert "Could not find a version" in msg
    assert rubin.available(tmp_path / "c") == []


def test_download_runs_this_pythons_pip_with_the_pinned_hash(monkeypatch, tmp_path):
    seen = {}

    def fake_run(cmd, **kw):
        seen["cmd"] = cmd
        seen["req"] = Path(cmd[cmd.index("-r") + 1]).read_text()
        raise FileNotFoundError("no such interpreter")

    monkeypatch.setattr(rubin.subprocess, "run", fake_run)
    with pytest.raises(rubin.RubinSchemaError, match="cannot run"):
        rubin._download(tmp_path)
    assert seen["cmd"][:5] == [sys.executable, "-m", "pip", "download", "--no-deps"]
    assert "--require-hashes" in seen["cmd"]
    assert seen["req"].strip() == f"lsst-alert-packet==30.2026.2700 --hash=sha256:{rubin.WHEEL_SHA256}"


def test_a_wheel_without_a_supported_version_is_an_error(monkeypatch, tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", versions=((11, 1),))
    monkeypatch.setattr(rubin, "_download", lambda tmp: wheel)
    with pytest.raises(rubin.RubinSchemaError, match="version.s. 10.0"):
        rubin.fetch(tmp_path / "c", quiet=True)


def test_not_fetched_says_the_command_to_run(tmp_path):
    for call in (lambda: rubin.load_schema(11, 1, tmp_path), lambda: rubin.sample_packets(10, 0, tmp_path),
                 lambda: rubin.require(11, 1, tmp_path)):
        with pytest.raises(rubin.SchemasNotFetched, match="run `ulens rubin fetch-schemas`"):
            call()
    assert rubin.add_to(schemas.Codec(), tmp_path) == []


# ---------------------------------------------------------------------------- the real files

@pytest.mark.parametrize("version", rubin.SUPPORTED, ids=lambda v: f"{v[0]}.{v[1]}")
def test_rubin_sample_packets_decode_through_the_default_codec(version):
    root = rubin_schemas(version)
    sid = rubin.schema_id(*version)
    codec = schemas.default_codec()
    assert sid in rubin.add_to(codec)
    # framed by a plain fastavro writer on the package's own schema files (not ours)
    own = fastavro.schema.load_schema(str(root / f"{version[0]}/{version[1]}/"
                                          f"lsst.v{version[0]}_{version[1]}.alert.avsc"))
    packets = rubin.sample_packets(*version)
    assert packets
    for rec in packets:
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, own, rec)
        kind, got = codec.decode_kinds(b"\x00" + struct.pack(">I", sid) + buf.getvalue(), ("alert", "rubin"))
        assert kind == "rubin" and got == rec
        assert got["diaSource"]["diaSourceId"] and "prvDiaSources" in got


def test_the_inlined_schema_equals_fastavros_own_resolution():
    rubin_schemas()
    for a, b in rubin.SUPPORTED:
        ours = fastavro.parse_schema(rubin.load_schema(a, b))
        theirs = fastavro.schema.load_schema(str(rubin.schema_dir() / f"{a}/{b}/lsst.v{a}_{b}.alert.avsc"))
        assert fastavro.schema.to_parsing_canonical_form(ours) == \
            fastavro.schema.to_parsing_canonical_form(theirs)
