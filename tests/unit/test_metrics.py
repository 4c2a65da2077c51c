from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from sparrow.metrics import LATENCY_BUCKETS, PrometheusMetrics


def _samples(m: PrometheusMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(m.render()[0].decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_command_counters_and_histogram_buckets_are_cumulative_and_inclusive() -> None:
    m = PrometheusMetrics()
    m.volume_served("v", 1 << 20)
    m.command_done("v", "read", 4096, LATENCY_BUCKETS[0])  # exactly on a bound: counts in that bucket
    m.command_done("v", "read", 4096, 0.003)
    m.command_done("v", "write", 512, 99.0)  # beyond the last bound: only +Inf
    s = _samples(m)
    read = (("op", "read"), ("volume", "v"))
    assert s[("sparrow_scsi_commands_total", read)] == 2
    assert s[("sparrow_scsi_bytes_total", read)] == 8192
    assert s[("sparrow_scsi_command_seconds_bucket", (("le", "5e-05"), *read))] == 1
    assert s[("sparrow_scsi_command_seconds_bucket", (("le", "0.0025"), *read))] == 1
    assert s[("sparrow_scsi_command_seconds_bucket", (("le", "0.005"), *read))] == 2
    assert s[("sparrow_scsi_command_seconds_count", read)] == 2
    write = (("op", "write"), ("volume", "v"))
    assert s[("sparrow_scsi_command_seconds_bucket", (("le", "10.0"), *write))] == 0
    assert s[("sparrow_scsi_command_seconds_bucket", (("le", "+Inf"), *write))] == 1
    other = (("op", "other"), ("volume", "v"))
    assert s[("sparrow_scsi_commands_total", other)] == 0  # exported from the start


def test_removed_volume_leaves_no_series() -> None:
    m = PrometheusMetrics()
    m.volume_served("gone", 1 << 20)
    m.command_done("gone", "read", 4096, 0.001)
    m.volume_removed("gone")
    assert b'volume="gone"' not in m.render()[0]
