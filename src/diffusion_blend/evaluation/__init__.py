"""Layer 8: evaluation (importance-weighted oracle, statistics, Pareto tooling, sweeps, reports)."""
