"""pipelines.memory: the device memory peak a run reports (XLA's peak_bytes_in_use; None where the
backend keeps no statistics, as jax's CPU backend)."""
from __future__ import annotations

import logging

import jax

from jaxvid.pipelines.memory import GIB, describe_peak, peak_memory_bytes, peak_memory_gib


class FakeDevice:
    def __init__(self, name: str, stats):
        self.name, self.stats = name, stats

    def memory_stats(self):
        if isinstance(self.stats, Exception):
            raise self.stats
        return self.stats

    def __str__(self):
        return self.name


def test_peak_is_the_largest_reported_one():
    devices = [FakeDevice("gpu:0", {"peak_bytes_in_use": 3 * GIB, "bytes_in_use": GIB}),
               FakeDevice("gpu:1", {"peak_bytes_in_use": 5 * GIB // 2}),
               FakeDevice("gpu:2", None), FakeDevice("gpu:3", NotImplementedError())]
    assert peak_memory_bytes(devices) == 3 * GIB and peak_memory_gib(devices) == 3.0
    assert describe_peak(devices).startswith("peak device memory 3.00 GiB (gpu:0, the largest of 2 devices")
    assert describe_peak(devices[:1]).startswith("peak device memory 3.00 GiB (gpu:0;")


def test_no_statistics_means_no_number():
    assert peak_memory_bytes([FakeDevice("x", None), FakeDevice("y", {"bytes_in_use": 1})]) is None
    assert describe_peak([FakeDevice("x", RuntimeError())]) is None
    if jax.devices()[0].memory_stats() is None:  # jax's CPU backend
        assert peak_memory_gib() is None


def test_cli_logs_the_peak(monkeypatch, caplog):
    import jaxvid.pipelines.memory as memory
    from jaxvid.cli.generate import _log_peak_memory

    monkeypatch.setattr(memory.jax, "local_devices", lambda: [FakeDevice("cuda:0", {"peak_bytes_in_use": 7 * GIB})])
    with caplog.at_level(logging.INFO, logger="jaxvid.cli.generate"):
        _log_peak_memory()
    assert "peak device memory 7.00 GiB (cuda:0;" in caplog.text
    monkeypatch.setattr(memory.jax, "local_devices", lambda: [FakeDevice("cpu:0", None)])
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="jaxvid.cli.generate"):
        _log_peak_memory()
    assert "peak device memory" not in caplog.text
