"""stoker.tune: search spaces, searchers, schedulers, trial runner, experiment store, reports."""
