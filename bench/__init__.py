"""Benchmarks (`make bench`): results are merged into reports/bench/*.json."""
