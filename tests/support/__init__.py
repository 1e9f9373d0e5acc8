"""Test support shared by every test package (and the benchmarks)."""
