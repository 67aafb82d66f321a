"""Ray Tune sweeps over pretraining jobs, scored by probing each trial's encoder (``earthray sweep``)."""

from earthray.tune.spec import Distribution, Sweep, SweepSpec, load_sweep

__all__ = ["Distribution", "Sweep", "SweepResult", "SweepSpec", "TrialRow", "load_sweep", "run_sweep",
           "summary_table"]


def __getattr__(name: str):
    """``run_sweep``, ``summary_table`` and the result types import Ray Tune: only when asked for."""
    if name in ("run_sweep", "summary_table", "SweepResult", "TrialRow"):
        from earthray.tune import sweep

        return getattr(sweep, name)
    raise AttributeError(name)
