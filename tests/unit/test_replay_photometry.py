"""Archival light-curve files: time-scale detection, parsing, errors naming file and line, ids."""
from __future__ import annotations

import numpy as np
import pytest

from replay import photometry_files as pf
from replay.stream import plan


@pytest.mark.parametrize("x, scale, mjd", [
    (2456000.5, "jd", 56000.0), (2400000.0, "jd", -0.5), (6000.25, "hjd_prime", 55999.75),
    (2000.0, "hjd_prime", 51999.5), (19999.9, "hjd_prime", 69999.4), (20000.0, "mjd", 20000.0),
    (61000.5, "mjd", 61000.5), (99999.0, "mjd", 99999.0)])
def test_time_scale_rule(x, scale, mjd):
    assert pf.time_scale(x) == scale
    assert pf.to_mjd([x], scale)[0] == pytest.approx(mjd, abs=1e-9)


@pytest.mark.parametrize("x", [0.0, 1999.9, 100_000.0, 1_000_000.0, 2_399_999.0, -5.0])
def test_time_scale_rejects_other_ranges(x):
    assert pf.time_scale(x) is None


def write(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_whitespace_table_with_header_comments_and_extra_columns(tmp_path):
    p = write(tmp_path, "ev1.dat", "# OGLE-like\n\nHJD  mag  err  seeing\n"
              "2456001.5 17.20 0.010 1.1  # first\n2456000.5\t17.30\t0.012 0.9\n"
              "2456002.5 17.00 0.011 1.0\n")
    mjd, mag, err, scale = pf.read_table(p)
    assert scale == "jd"
    assert mjd.tolist() == [56000.0, 56001.0, 56002.0]       # sorted
    assert mag.tolist() == [17.30, 17.20, 17.00] and err.tolist() == [0.012, 0.010, 0.011]


def test_csv_table_in_hjd_prime_and_mjd(tmp_path):
    a = write(tmp_path, "a.csv", "time,mag,err\n6000.0,18.1,0.02\n6001.0,18.0,0.02\n")
    b = write(tmp_path, "b.csv", "56000.0, 18.1, 0.02\n56001.0 ,18.0,0.02\n")
    assert pf.read_table(a)[0].tolist() == [55999.5, 56000.5]
    assert pf.read_table(b)[0].tolist() == [56000.0, 56001.0]


@pytest.mark.parametrize("body, line, match", [
    ("2456000.5 17.2 0.01\n2456001.5 17.1\n", 2, "expected 3 columns"),
    ("2456000.5 17.2 0.01\n2456001.5 abc 0.01\n", 2, r"column 2 \(mag\) is not a number"),
    ("# c\n2456000.5 17.2 0.01\n2456001.5 nan 0.01\n", 3, "not finite"),
    ("2456000.5 17.2 0.01\n2456001.5 17.2 0\n", 2, "error must be positive"),
    ("2456000.5 17.2 0.01\n2456001.5 17.2 -0.1\n", 2, "error must be positive"),
    ("2456000.5 17.2 0.01\n2456000.5 17.3 0.01\n", 2, "repeats line 1"),
    ("2456000.5 17.2 0.01\n56001.5 17.3 0.01\n", 2, "not JD/HJD like the first row"),
    ("150000 17.2 0.01\n", 1, "no known range"),
    ("2456000.5 17.2 0.01\n2456001.5 17.2 inf\n", 2, "not finite"),
    ("time mag err\n2456000.5 17.2 0.01\nHJD mag err\n", 3, "is not a number"),
])
def test_bad_rows_are_errors_naming_file_and_line(tmp_path, body, line, match):
    p = write(tmp_path, "bad.dat", body)
    with pytest.raises(pf.PhotometryFileError, match=match) as exc:
        pf.read_table(p)
    assert f"{p}:{line}:" in str(exc.value)
    assert isinstance(exc.value, ValueError)


def test_empty_missing_and_binary_files(tmp_path):
    with pytest.raises(pf.PhotometryFileError, match="no data rows"):
        pf.read_table(write(tmp_path, "e.dat", "# nothing\n\n"))
    with pytest.raises(pf.PhotometryFileError, match="not found"):
        pf.read_table(tmp_path / "missing.dat")
    b = tmp_path / "b.dat"
    b.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(pf.PhotometryFileError, match="not a text file"):
        pf.read_table(b)


def test_object_ids_are_stable_hashes_of_the_base_name(tmp_path):
    assert pf.object_id_for("/x/y/OGLE-2012-BLG-0026.dat") == pf.object_id_for("OGLE-2012-BLG-0026.dat")
    assert pf.object_id_for("OGLE-2012-BLG-0026.dat") == 16_123_799_928_628   # pinned: blake2b-64
    assert 10**13 <= pf.object_id_for("a") < 2 * 10**13
    assert pf.object_id_for("a.dat") != pf.object_id_for("b.dat")


def test_load_files_builds_light_curves_and_rejects_duplicate_names(tmp_path):
    (tmp_path / "d1").mkdir()
    (tmp_path / "d2").mkdir()
    a = write(tmp_path / "d1", "ev.dat", "2456000.5 17.2 0.01\n2456001.5 17.0 0.01\n2456002.5 17.3 0.01\n")
    b = write(tmp_path / "d2", "ev.dat", "56000.1 18.0 0.02\n")
    with pytest.raises(pf.PhotometryFileError, match="use --object-id-start"):
        pf.load_files([a, b])
    lc = pf.load_files([a, b], object_id_start=500)
    assert lc.object_id.tolist() == [500, 501] and lc.offsets.tolist() == [0, 3, 4]
    assert lc.baseline_mag[0] == pytest.approx(np.percentile([17.2, 17.0, 17.3], 75))
    assert lc.names == [str(a), str(b)] and lc.label is None and lc.start_mjd is None
    p = plan(lc)
    assert p.mjd.tolist() == [56000.0, 56000.1, 56001.0, 56002.0]


def test_load_files_reads_everything_before_returning(tmp_path):
    good = write(tmp_path, "good.dat", "2456000.5 17.2 0.01\n")
    bad = write(tmp_path, "bad.dat", "2456000.5 17.2 0.01\n2456001.5 x 0.01\n")
    with pytest.raises(pf.PhotometryFileError, match=f"{bad}:2:"):
        pf.load_files([good, bad])
