"""Overload: offered twice its capacity, a server with --max-concurrent-calls sheds the excess
at once with UNAVAILABLE (OVERLOADED), keeps serving the rest right, fails nothing else, and
stays within its memory. A short run of bench/overload.py (which reports the figures)."""
import sys
from pathlib import Path

import layerd_server
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
import overload  # noqa: E402


@pytest.mark.parametrize("name,flags", overload.CONFIGS, ids=[name for name, _ in overload.CONFIGS])
def test_twice_the_capacity_is_shed_not_failed(tmp_path, name, flags):
    target = layerd_server.BINARY.parent
    rows, _, server = overload.measure(target, repeats=1, duration="1s", warmup="300ms", tmp=tmp_path, flags=flags)
    [row] = rows
    assert set(row["errors"]) == {"Unavailable"}, row["errors"]  # no INTERNAL, UNKNOWN, ...
    assert "overloaded" in row["error_examples"]["Unavailable"]
    assert row["mismatches"] == 0
    assert row["shed_fraction"] > 0.2, row
    if "--initial-stream-window=64KiB" in flags:  # else shed calls upload (much of) their body first
        assert row["accepted_calls_per_s"] > 0.5 * row["capacity_calls_per_s"], row
    assert server["shed_total"] >= row["errors"]["Unavailable"]
    assert server["in_flight_after"] == 0
    # L calls of 256 KiB each way, plus HTTP/2 windows: far below this.
    assert server["rss_peak_mib"] < server["rss_idle_mib"] + 384, server
    assert server["alive"] and server["panics"] == 0 and server["exit_code"] == 0, server
