"""Tests for jaxreg.io.points: landmark files (ANTs CSV, Slicer FCSV and markups JSON)."""

import json
import os

import numpy as np
import pytest

from jaxreg.io import InputError
from jaxreg.io.points import Points, lps_to_ras, ras_to_lps, read_points, write_points

NAMES = ["pts.csv", "pts.fcsv", "pts.mrk.json", "pts.json"]

# Awkward values: repr-only digits, tiny and huge magnitudes, negative zero.
RAS = np.array([[0.1, -2.0 / 3.0, 1e-300], [123456.789, -0.0, 7.0], [-1e10, 3.3, -4.4]])

FCSV_HEADER = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = {}\n"
               "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
FCSV_ROWS = ("vtkMRMLMarkupsFiducialNode_0,-10.5,20.25,30,0,0,0,1,1,1,0,F-1,,\n"
             "vtkMRMLMarkupsFiducialNode_1,1,2,3,0,0,0,1,1,1,0,F-2,a note,vtkMRMLScalarVolumeNode1\n")


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def _markups(system, points, **extra):
    control = [{"id": str(i), "label": f"F-{i}", "description": "", "associatedNodeID": "",
                "position": p, "orientation": [-1.0, -0.0, -0.0, -0.0, -1.0, -0.0, 0.0, 0.0, 1.0],
                "selected": True, "locked": False, "visibility": True,
                "positionStatus": "defined"} for i, p in enumerate(points, 1)]
    markup = {"type": "Fiducial", "coordinateSystem": system, "coordinateUnits": "mm",
              "locked": False, "labelFormat": "%N-%d", "controlPoints": control, **extra}
    if system is None:
        del markup["coordinateSystem"]
    return json.dumps({"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/"
                       "Modules/Loadable/Markups/Resources/Schema/markups-schema-v1.0.3.json#",
                       "markups": [markup]}, indent=4)


# ---------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_is_exact(tmp_path, name):
    path = tmp_path / name
    write_points(path, Points(RAS, ("tumour centre", " a, b ", 'say "x"')))
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, RAS)
    assert pts.ras.dtype == np.float64 and pts.ras.shape == (3, 3)
    assert pts.labels == ("tumour centre", " a, b ", 'say "x"')
    assert pts.path == str(path)
    assert sorted(os.listdir(tmp_path)) == [name]


@pytest.mark.parametrize("name", NAMES)
def test_array_gets_default_labels(tmp_path, name):
    path = tmp_path / name
    write_points(str(path), RAS.tolist())
    pts = read_points(str(path))
    np.testing.assert_array_equal(pts.ras, RAS)
    assert pts.labels == ("P-1", "P-2", "P-3")


def test_files_are_written_in_lps(tmp_path):
    write_points(tmp_path / "a.csv", [[1.5, 2.0, 3.0]], labels=["L"])
    assert (tmp_path / "a.csv").read_text() == "x,y,z,t,label\n-1.5,-2.0,3.0,0,L\n"
    write_points(tmp_path / "a.fcsv", [[1.5, 2.0, 3.0]])
    text = (tmp_path / "a.fcsv").read_text()
    assert text.startswith(FCSV_HEADER.format("LPS"))
    assert text.endswith("vtkMRMLMarkupsFiducialNode_0,-1.5,-2.0,3.0,0,0,0,1,1,1,0,P-1,,\n")
    write_points(tmp_path / "a.mrk.json", [[1.5, 2.0, 3.0]])
    doc = json.loads((tmp_path / "a.mrk.json").read_text())
    assert "markups-schema-v1.0.3.json" in doc["@schema"]
    (markup,) = doc["markups"]
    assert markup["type"] == "Fiducial" and markup["coordinateSystem"] == "LPS"
    assert markup["controlPoints"][0]["position"] == [-1.5, -2.0, 3.0]
    assert markup["controlPoints"][0]["label"] == "P-1"


def test_lps_ras_conversion():
    xyz = np.array([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]])
    np.testing.assert_array_equal(lps_to_ras(xyz), [[-1.0, 2.0, 3.0], [-4.0, -5.0, -6.0]])
    np.testing.assert_array_equal(ras_to_lps(lps_to_ras(xyz)), xyz)
    assert lps_to_ras([1, 2, 3]).tolist() == [-1.0, -2.0, 3.0]
    assert xyz[0, 0] == 1.0  # the input is not changed


def test_points_are_validated_and_read_only():
    pts = Points([[1, 2, 3]], ["a"])
    assert pts.ras.dtype == np.float64 and pts.ras.shape == (1, 3)
    with pytest.raises(ValueError):
        pts.ras[0, 0] = 5.0
    with pytest.raises(ValueError, match="got 2 labels for 1 points"):
        Points([[1, 2, 3]], ["a", "b"])


# ---------------------------------------------------------------- hand-written files


def test_ants_csv_as_ants_writes_it(tmp_path):
    path = _write(tmp_path / "p.csv", "x,y,z,t,label,comment\n"
                                      "-10.5,20.25,30,0,1,\n1,2,3,0,2,tip\n")
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, [[10.5, -20.25, 30.0], [-1.0, -2.0, 3.0]])
    assert pts.labels == ("1", "2")


def test_ants_csv_other_column_order_extra_columns_no_t(tmp_path):
    path = _write(tmp_path / "p.CSV", "Label, Z ,comment,Y,X\r\nA,30,c1,20.25,-10.5\r\n"
                                      "\r\nB,3,,2,1\r\n")
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, [[10.5, -20.25, 30.0], [-1.0, -2.0, 3.0]])
    assert pts.labels == ("A", "B")


def test_ants_csv_without_label_column(tmp_path):
    pts = read_points(_write(tmp_path / "p.csv", "x,y,z,t\n1,2,3,0\n"))
    np.testing.assert_array_equal(pts.ras, [[-1.0, -2.0, 3.0]])
    assert pts.labels == ("",)


@pytest.mark.parametrize("system", ["LPS", "1"])
def test_fcsv_in_lps(tmp_path, system):
    pts = read_points(_write(tmp_path / "f.fcsv", FCSV_HEADER.format(system) + FCSV_ROWS))
    np.testing.assert_array_equal(pts.ras, [[10.5, -20.25, 30.0], [-1.0, -2.0, 3.0]])
    assert pts.labels == ("F-1", "F-2")


@pytest.mark.parametrize("system", ["RAS", "0"])
def test_fcsv_in_ras(tmp_path, system):
    pts = read_points(_write(tmp_path / "f.fcsv", FCSV_HEADER.format(system) + FCSV_ROWS))
    np.testing.assert_array_equal(pts.ras, [[-10.5, 20.25, 30.0], [1.0, 2.0, 3.0]])
    assert pts.labels == ("F-1", "F-2")


def test_fcsv_without_columns_or_coordinate_system_lines(tmp_path):
    # Old Slicer: no columns line (default order) and no CoordinateSystem (RAS).
    path = _write(tmp_path / "f.fcsv", "# Markups fiducial file version = 4.4\n" + FCSV_ROWS)
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, [[-10.5, 20.25, 30.0], [1.0, 2.0, 3.0]])
    assert pts.labels == ("F-1", "F-2")


def test_fcsv_with_its_own_column_order(tmp_path):
    path = _write(tmp_path / "f.fcsv", "# CoordinateSystem = LPS\n# columns = label,z,y,x\n"
                                       "tip,3,2,1\n")
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, [[-1.0, -2.0, 3.0]])
    assert pts.labels == ("tip",)


@pytest.mark.parametrize("system, expected", [
    ("LPS", [[10.5, -20.25, 30.0], [-1.0, -2.0, 3.0]]),
    ("RAS", [[-10.5, 20.25, 30.0], [1.0, 2.0, 3.0]]),
    (None, [[10.5, -20.25, 30.0], [-1.0, -2.0, 3.0]]),  # the schema's default: LPS
])
def test_markups_json(tmp_path, system, expected):
    path = _write(tmp_path / "m.mrk.json", _markups(system, [[-10.5, 20.25, 30], [1, 2, 3]]))
    pts = read_points(path)
    np.testing.assert_array_equal(pts.ras, expected)
    assert pts.labels == ("F-1", "F-2")


def test_markups_json_skips_unplaced_points_and_reads_every_markup(tmp_path):
    doc = json.loads(_markups("LPS", [[1, 2, 3], [4, 5, 6]]))
    doc["markups"][0]["controlPoints"][1]["positionStatus"] = "undefined"
    del doc["markups"][0]["controlPoints"][1]["position"]
    second = json.loads(_markups("RAS", [[7, 8, 9]]))["markups"][0]
    doc["markups"].append({**second, "type": "Line"})
    pts = read_points(_write(tmp_path / "m.json", json.dumps(doc)))
    np.testing.assert_array_equal(pts.ras, [[-1.0, -2.0, 3.0], [7.0, 8.0, 9.0]])
    assert pts.labels == ("F-1", "F-1")


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize("name, text, problem", [
    ("p.csv", "x,y,z,t\n1,2,3,0\n1,2\n", r"p\.csv line 3: expected 3 coordinates, got 2"),
    ("p.csv", "x,y,z\n1,abc,3\n", r"p\.csv line 2: coordinate 'abc' is not a number"),
    ("p.csv", "x,y,z\n1,nan,3\n", r"p\.csv line 2: non-finite coordinates"),
    ("p.csv", "x,y,z\n1,2,inf\n", r"p\.csv line 2: non-finite coordinates"),
    ("p.csv", "a,b,c\n1,2,3\n", r"p\.csv line 1: header 'a,b,c' has no column x, y, z"),
    ("p.csv", "x,y,z\n1,2,3,4\n", r"p\.csv line 2: 4 fields, header has 3"),
    ("p.csv", "x,y,z,t\n", r"p\.csv: no points"),
    ("p.csv", "", r"p\.csv: no points"),
    ("f.fcsv", FCSV_HEADER.format("XYZ") + FCSV_ROWS, r"f\.fcsv: unknown CoordinateSystem 'XYZ'"),
    ("f.fcsv", FCSV_HEADER.format("LPS"), r"f\.fcsv: no points"),
    ("f.fcsv", FCSV_HEADER.format("LPS") + "id,1,2\n",
     r"f\.fcsv line 4: expected 3 coordinates, got 2"),
    ("f.fcsv", "# columns = id,a,b\n", r"f\.fcsv line 1: columns 'id,a,b' lack x, y or z"),
    ("m.mrk.json", '{"markups": [', r"m\.mrk\.json: bad JSON"),
    ("m.mrk.json", "[]", r"m\.mrk\.json: not a Slicer markups file"),
    ("m.mrk.json", _markups("XYZ", [[1, 2, 3]]),
     r"m\.mrk\.json markup 1: unknown coordinateSystem 'XYZ'"),
    ("m.mrk.json", _markups("LPS", [[1, 2]]),
     r"m\.mrk\.json markup 1 control point 1: expected 3 coordinates, got 2"),
    ("m.mrk.json", _markups("LPS", [[1, "2", None]]),
     r"m\.mrk\.json markup 1 control point 1: coordinate None is not a number"),
    ("m.mrk.json", _markups("LPS", [[1, 2, float("nan")]]),
     r"m\.mrk\.json markup 1 control point 1: non-finite coordinates"),
    ("m.mrk.json", _markups("LPS", []), r"m\.mrk\.json: no points"),
    ("m.mrk.json", _markups("LPS", [[1, 2, 3]], coordinateUnits="um"),
     r"m\.mrk\.json markup 1: unsupported coordinateUnits 'um'"),
])
def test_bad_files_name_path_and_problem(tmp_path, name, text, problem):
    path = _write(tmp_path / name, text)
    with pytest.raises(InputError, match=f"^{tmp_path}/{problem}") as err:
        read_points(path)
    assert "\n" not in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=f"^{tmp_path}/nope.csv: point file not found"):
        read_points(tmp_path / "nope.csv")


def test_folder(tmp_path):
    (tmp_path / "d.csv").mkdir()
    with pytest.raises(InputError, match=f"^{tmp_path}/d.csv: is a folder"):
        read_points(tmp_path / "d.csv")


def test_not_utf8(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"x,y,z\n1,2,3\xff\n")
    with pytest.raises(InputError, match=f"^{tmp_path}/p.csv: not UTF-8"):
        read_points(path)


def test_utf8_byte_order_mark_is_accepted(tmp_path):
    path = tmp_path / "p.csv"
    path.write_bytes(b"\xef\xbb\xbfx,y,z\n1,2,3\n")
    np.testing.assert_array_equal(read_points(path).ras, [[-1.0, -2.0, 3.0]])


def test_unknown_suffix_lists_supported(tmp_path):
    path = _write(tmp_path / "p.txt", "x,y,z\n1,2,3\n")
    with pytest.raises(InputError, match=r"p\.txt: unknown point file suffix "
                                         r"\(supported: \.fcsv, \.csv, \.mrk\.json, \.json\)"):
        read_points(path)
    with pytest.raises(InputError, match=r"p\.vtk: unknown point file suffix"):
        write_points(tmp_path / "p.vtk", [[1, 2, 3]])


@pytest.mark.parametrize("points, labels, problem", [
    ([1.0, 2.0, 3.0], None, r"\(N, 3\) array, got shape \(3,\)"),
    ([[1.0, 2.0]], None, r"\(N, 3\) array, got shape \(1, 2\)"),
    (np.zeros((0, 3)), None, "at least one point"),
    ([[1.0, np.nan, 3.0]], None, "non-finite"),
    ([[1.0, 2.0, np.inf]], None, "non-finite"),
    ([[1.0, 2.0, 3.0]], ["a", "b"], "got 2 labels for 1 points"),
    ([[1.0, 2.0, 3.0]], [7], "labels must be strings"),
    ([[1.0, 2.0, 3.0]], ["two\nlines"], "line breaks"),
])
def test_invalid_points_are_refused_and_old_file_kept(tmp_path, points, labels, problem):
    for name in NAMES:
        path = tmp_path / name
        write_points(path, [[1.0, 2.0, 3.0]])
        before = path.read_bytes()
        if "line breaks" in problem and name.endswith("json"):
            continue  # JSON holds any label
        with pytest.raises(ValueError, match=problem):
            write_points(path, points, labels=labels)
        assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == sorted(NAMES)


def test_failed_write_leaves_existing_file(tmp_path, monkeypatch):
    path = tmp_path / "p.fcsv"
    write_points(path, [[1.0, 2.0, 3.0]])
    before = path.read_bytes()

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        write_points(path, [[4.0, 5.0, 6.0]])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["p.fcsv"]
