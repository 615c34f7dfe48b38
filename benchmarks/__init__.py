"""Reproducible performance runs of veil against raw DuckDB, OpenDP and SmartNoise SQL."""
