"""Benchmarks: scripts run by hand from the project root (`python -m benchmarks.<name>`); see README.md here."""
