"""Benchmarks of the template against hand-written loops and peers: `make bench` or `python -m bench`."""
