"""Class names a class raster carries about itself, read and written the way GDAL and QGIS keep them.

GeoTIFF has no place for category names, so GDAL keeps them in a PAM sidecar (``<file>.aux.xml``): a list of
``<CategoryNames>`` (index = pixel value) or a raster attribute table (a value and a name column). ENVI
classification headers list ``class names`` (index = pixel value). rasterio exposes neither, hence this module.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from pathlib import Path
from xml.sax.saxutils import escape

from earthray.io.scene import RasterError

# GDALRATFieldUsage: GFU_Name = 2, GFU_MinMax = 5 (the class value of a thematic table).
_NAME_USAGE, _VALUE_USAGE = "2", "5"
_NAME_FIELDS = ("class_name", "classname", "name", "class", "label")
_VALUE_FIELDS = ("value", "class_value", "id", "code")


def category_sidecar(path: str | Path, classes: Sequence[str]) -> Path:
    """Write ``<path>.aux.xml``: GDAL's PAM file naming band 1's class values (what GTiff cannot hold itself)."""
    names = "".join(f"<Category>{escape(c)}</Category>" for c in classes)
    aux = Path(f"{path}.aux.xml")
    aux.write_text(f'<PAMDataset><PAMRasterBand band="1"><CategoryNames>{names}</CategoryNames>'
                   "</PAMRasterBand></PAMDataset>\n")
    return aux


def read_categories(path: str | Path) -> dict[int, str] | None:
    """Band 1's class value -> name, from its PAM sidecar or ENVI header; None when the raster names none.

    Values with an empty name are left out (GDAL pads the list from value 0), so they read as unlabelled.
    """
    path = Path(path)
    aux = Path(f"{path}.aux.xml")
    if aux.is_file():
        try:
            root = ET.parse(aux).getroot()
        except ET.ParseError as e:
            raise RasterError(f"{aux}: not a GDAL PAM file ({e})") from None
        band = next((b for b in root.iter("PAMRasterBand") if b.get("band", "1") == "1"), None)
        if band is not None:
            if (names := band.find("CategoryNames")) is not None:
                return _named(enumerate((c.text or "").strip() for c in names.iter("Category")))
            if (table := band.find("GDALRasterAttributeTable")) is not None:
                return _named(_rat_rows(table, aux))
    for header in {path.with_suffix(".hdr"), Path(f"{path}.hdr")}:
        if not header.is_file():
            continue
        match = re.search(r"^\s*class names\s*=\s*\{([^}]*)\}", header.read_text(errors="replace"), re.M | re.I)
        if match:
            return _named(enumerate(n.strip() for n in match.group(1).split(",")))
    return None


def _rat_rows(table: ET.Element, where: Path) -> list[tuple[int, str]]:
    fields = [((f.findtext("Name") or "").strip(), (f.findtext("Usage") or "").strip()) for f in table.iter("FieldDefn")]

    def column(usage: str, names: tuple[str, ...]) -> int | None:
        by_usage = [i for i, (_, u) in enumerate(fields) if u == usage]
        by_name = [i for i, (n, _) in enumerate(fields) if n.lower() in names]
        return (by_usage or by_name or [None])[0]

    name_col, value_col = column(_NAME_USAGE, _NAME_FIELDS), column(_VALUE_USAGE, _VALUE_FIELDS)
    if name_col is None:
        raise RasterError(f"{where}: the attribute table has no name column (fields: {[n for n, _ in fields]})")
    start, step = float(table.get("Row0Min", 0)), float(table.get("BinSize", 1))
    rows = []
    for i, row in enumerate(table.iter("Row")):
        cells = [(f.text or "").strip() for f in row.iter("F")]
        try:
            value = float(cells[value_col]) if value_col is not None else start + step * int(row.get("index", i))
            rows.append((int(value), cells[name_col]))
        except (ValueError, IndexError):
            raise RasterError(f"{where}: attribute table row {i} is not a class value and name: {cells}") from None
    return rows


def _named(pairs) -> dict[int, str] | None:
    named = {int(v): n for v, n in pairs if n}
    return named or None
