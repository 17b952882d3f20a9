"""Bench smoke test of the server stages: tiny MLLP and HTTP loads on loopback; shape, not timings."""
from __future__ import annotations

from gateway.bench import BenchOptions, run_bench


def test_mllp_and_http_stages_run_and_stop_their_servers(tmp_path) -> None:
    options = BenchOptions(quick=True, stages=("mllp", "http"), mllp_rate=10, mllp_clients=2, mllp_seconds=0.5,
                           http_clients=2, http_requests=4, workdir=str(tmp_path))
    report = run_bench(options, echo=lambda line: None)
    mllp, http = report.results
    assert (mllp.name, http.name) == ("mllp", "http")
    assert mllp.status == "ok", mllp.note
    assert mllp.extra["sent"] == 5 and sum(mllp.extra["answers"].values()) == 5
    assert mllp.extra["answers"].get("AA", 0) >= 1 and mllp.items == mllp.extra["answers"].get("AA", 0) + \
        sum(v for k, v in mllp.extra["answers"].items() if k not in ("AA", "unanswered"))
    assert len(mllp.latencies_ms) == 5 and mllp.p99_ms is not None
    assert http.status == "ok", http.note
    assert http.extra["statuses"] == {200: 4} and http.items == 4 and len(http.latencies_ms) == 4
    assert http.extra["server_cpu_s"] >= 0
    # both servers wrote where the run said, and were stopped: their logs are complete files
    assert (tmp_path / "mllp-server.log").exists() and (tmp_path / "http-server.log").exists()
    assert (tmp_path / "mllp" / "gateway.db").exists() and (tmp_path / "http" / "gateway.db").exists()
