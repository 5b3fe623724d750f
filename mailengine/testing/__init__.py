"""Helpers for tests and benchmarks of mailengine: real peers on loopback."""
