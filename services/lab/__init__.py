"""Tooling apart from the product: benchmarks, the spike and chaos drills, the simulated fleet and
engines, calibration and the cost calculator. Nothing in the product imports it; `grokstack`
reaches its commands (bench, chaos, cost) through services/cli.py."""
