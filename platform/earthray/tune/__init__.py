"""Ray Tune sweeps over pretraining jobs, scored by probing each trial's encoder (``earthray sweep``)."""

from earthray.tune.spec import Distribution, Sweep, SweepSpec, load_sweep

__all__ = ["Distribution", "Sweep", "SweepSpec", "load_sweep", "run_sweep", "summary_table"]


def __getattr__(name: str):
    """``run_sweep`` and ``summary_table`` import Ray Tune: only when asked for."""
    if name in ("run_sweep", "summary_table", "SweepResult"):
        from earthray.tune import sweep

        return getattr(sweep, name)
    raise AttributeError(name)
