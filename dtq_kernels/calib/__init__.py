"""Calibration: statistics collection, the published DiT PTQ methods, recipes -> QuantPlan."""
from .driver import calibrate, collect_stats
from .recipes import Recipe, get_recipe, recipes
from .stats import CalibStats, StatsConfig

__all__ = ["calibrate", "collect_stats", "recipes", "get_recipe", "Recipe", "CalibStats", "StatsConfig",
           "make_plots"]


def make_plots(stats_or_plan, out_dir):
    """See calib.plots.make_plots (imported lazily: matplotlib is only needed for plots)."""
    from .plots import make_plots as _make_plots
    return _make_plots(stats_or_plan, out_dir)
