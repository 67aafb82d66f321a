"""Sensor catalogue: bands, wavelengths, GSD, dtype, nodata, value transforms, normalisation."""

from earthray.sensors.catalogue import Catalogue, default_catalogue, get_sensor, load_catalogue
from earthray.sensors.sensor import STD_FLOOR, Band, Sensor, ValueTransform

__all__ = ["STD_FLOOR", "Band", "Catalogue", "Sensor", "ValueTransform", "default_catalogue", "get_sensor", "load_catalogue"]
