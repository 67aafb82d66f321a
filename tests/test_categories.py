"""Class names from the label source itself (issue 15, item 14): a label raster that names its classes (GDAL
categories or attribute table in its ``.aux.xml``, an ENVI classification header) needs no ``classes`` in the
spec, and a label source that contradicts itself or cannot be read is refused before anything is written."""

import re
import shutil

import numpy as np
import pytest
import yaml
from affine import Affine
from rasterio.crs import CRS
from typer.testing import CliRunner

from earthray.cli import EXIT_CONFIG, app
from earthray.config import ConfigError
from earthray.data.ingest import plan
from earthray.data.spec import load_spec
from earthray.io import RasterError, category_sidecar, read_categories, write_raster
from earthray.io.grid import Grid
from earthray.sensors import default_catalogue

LANDSAT7 = [f"landsat7_nc/lsat7_2000_{b}0.tif" for b in (1, 2, 3, 4, 5, 7)]
NAMES = ["developed", "agriculture", "herbaceous", "shrubland", "forest", "water", "sediment"]


def test_a_written_class_map_reads_back_its_names(tmp_path):
    grid = Grid(CRS.from_epsg(32631), Affine(30, 0, 500000, 0, -30, 4000060), 2, 2)
    write_raster(tmp_path / "map.tif", np.array([[0, 1], [1, 0]], np.uint8), grid, classes=["water", "forest"])
    assert read_categories(tmp_path / "map.tif") == {0: "water", 1: "forest"}
    assert read_categories(tmp_path / "nothing.tif") is None


def test_attribute_table_and_envi_header(tmp_path):
    (tmp_path / "rat.tif.aux.xml").write_text(
        '<PAMDataset><PAMRasterBand band="1"><GDALRasterAttributeTable tableType="thematic">'
        "<FieldDefn index=\"0\"><Name>Value</Name><Type>0</Type><Usage>5</Usage></FieldDefn>"
        "<FieldDefn index=\"1\"><Name>Count</Name><Type>0</Type><Usage>1</Usage></FieldDefn>"
        "<FieldDefn index=\"2\"><Name>Class_Name</Name><Type>2</Type><Usage>2</Usage></FieldDefn>"
        "<Row index=\"0\"><F>11</F><F>5</F><F>Open water</F></Row>"
        "<Row index=\"1\"><F>42</F><F>9</F><F>Evergreen forest</F></Row>"
        "</GDALRasterAttributeTable></PAMRasterBand></PAMDataset>")
    assert read_categories(tmp_path / "rat.tif") == {11: "Open water", 42: "Evergreen forest"}
    (tmp_path / "cls.hdr").write_text("ENVI\nsamples = 2\nlines = 2\nbands = 1\nfile type = ENVI Classification\n"
                                      "classes = 3\nclass names = {Unclassified, water,\n forest}\n")
    assert read_categories(tmp_path / "cls.img") == {0: "Unclassified", 1: "water", 2: "forest"}
    (tmp_path / "bad.tif.aux.xml").write_text("<PAMDataset><PAMRasterBand")
    with pytest.raises(RasterError, match="bad.tif.aux.xml: not a GDAL PAM file"):
        read_categories(tmp_path / "bad.tif")


@pytest.fixture
def labelled(tmp_path, sample_dir):
    """Two Landsat 7 scenes of one group, each with its own copy of the sample's strata raster (and names)."""
    for scene in ("a", "b"):
        d = tmp_path / scene
        d.mkdir()
        shutil.copy(sample_dir / "landsat7_nc/strata.tif", d / "strata.tif")
        shutil.copy(sample_dir / "landsat7_nc/strata.tif.aux.xml", d / "strata.tif.aux.xml")
    spec = {"output": str(tmp_path / "out"), "chip_size": 32, "inputs": [
        {"name": scene, "group": "l7", "label": {"path": str(tmp_path / scene / "strata.tif")},
         "sensors": {"landsat7_etm": {"stack": [str(sample_dir / f) for f in LANDSAT7],
                                      "bands": ["B1", "B2", "B3", "B4", "B5", "B7"]}}}
        for scene in ("a", "b")]}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_the_label_rasters_categories_name_the_classes(labelled):
    tasks = plan(load_spec(labelled), default_catalogue())
    assert [t.labels[0]["codes"] for t in tasks] == [dict(enumerate(NAMES, start=1))] * 2


@pytest.mark.parametrize("edit, fragment", [
    (lambda d: category_sidecar(d / "b" / "strata.tif", ["", *reversed(NAMES)]),
     "(both in group 'l7') name different classes"),
    (lambda d: (d / "b" / "strata.tif.aux.xml").write_text("<PAMDataset>"), "strata.tif.aux.xml: not a GDAL PAM file"),
])
def test_a_contradicting_or_unreadable_label_source_is_refused_before_writing(labelled, edit, fragment):
    edit(labelled.parent)
    with pytest.raises(ConfigError, match=re.escape(fragment)) as e:
        plan(load_spec(labelled), default_catalogue())
    assert "inputs.b.label" in str(e.value)
    result = CliRunner().invoke(app, ["ingest", str(labelled)])
    assert result.exit_code == EXIT_CONFIG and fragment in result.output and result.output.count("\n") == 1
    assert "Traceback" not in result.output and not (labelled.parent / "out").exists()


def test_the_spec_names_win_over_the_rasters(labelled):
    spec = yaml.safe_load(labelled.read_text())
    for inp in spec["inputs"]:
        inp["label"] |= {"classes": [f"c{i}" for i in range(7)], "first_class": 1}
    labelled.write_text(yaml.safe_dump(spec))
    tasks = plan(load_spec(labelled), default_catalogue())
    assert all(t.labels[0]["codes"] is None and t.labels[0]["classes"][0] == "c0" for t in tasks)
