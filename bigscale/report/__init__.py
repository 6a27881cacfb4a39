"""Pictures of runs: curves over steps from each run's metrics.jsonl, several runs overlaid, and
the settings that differ between them from their config.yaml (``bigscale report``, and the
``report.html`` every run writes when it ends)."""
