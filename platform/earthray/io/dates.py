"""Acquisition dates from the names and metadata that real products carry them in."""

from __future__ import annotations

import re
from datetime import datetime

# 20170101T055210 (Sentinel names), then 2017-01-01 / 20170101 (Landsat names, tags).
_STAMP = re.compile(r"(?<!\d)(\d{4})-?(\d{2})-?(\d{2})(?:[T ](\d{2}):?(\d{2}):?(\d{2}))?(?!\d)")
_TAGS = ("ACQUISITIONDATETIME", "DATETIME", "TIFFTAG_DATETIME", "acquisition_date", "DATE_ACQUIRED")


def parse_date(text: str | None) -> datetime | None:
    """The first plausible date in ``text`` (satellite era, valid calendar date), else None."""
    if not text:
        return None
    for m in _STAMP.finditer(text):
        y, mo, d, hh, mm, ss = m.groups()
        try:
            dt = datetime(int(y), int(mo), int(d), int(hh or 0), int(mm or 0), int(ss or 0))
        except ValueError:
            continue
        if 1970 <= dt.year <= 2100:
            return dt
    return None


def date_from_tags(tags: dict[str, str]) -> datetime | None:
    for key in _TAGS:
        for k, v in tags.items():
            if k.upper() == key.upper():
                dt = parse_date(v.replace(":", "-", 2) if k.upper() == "TIFFTAG_DATETIME" else v)
                if dt:
                    return dt
    return None
