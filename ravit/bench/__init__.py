"""Measurement: GMACs per image (``flops``), throughput and latency (``speed``)."""

from ravit.bench.flops import count_gmacs

__all__ = ["count_gmacs"]
