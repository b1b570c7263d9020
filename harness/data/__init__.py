"""Benchmark data: downloads with checksums, a user cache, annotation parsing."""
