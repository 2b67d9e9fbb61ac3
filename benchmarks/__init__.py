"""The benchmarks behind the figures of the README and benchmarks/RESULTS.md; `python -m benchmarks` runs them all."""
