"""earthray: train, tune and serve multi-sensor Earth-observation foundation models on Ray."""

__version__ = "0.1.0"
