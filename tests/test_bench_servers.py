"""Bench smoke test of the server stages: tiny MLLP and HTTP loads on loopback; shape, not timings."""
from __future__ import annotations

from gateway.bench import BenchOptions, run_bench


def test_mllp_and_http_stages_run_and_stop_their_servers(tmp_path) -> None:
    options = BenchOptions(quick=True, stages=("mllp", "mllp-queued", "http"), mllp_rate=10, mllp_clients=2,
                           mllp_seconds=0.5, http_clients=2, http_requests=4, workdir=str(tmp_path),
                           queue_record_group=3)
    report = run_bench(options, echo=lambda line: None)
    mllp, queued, http = report.results
    assert (mllp.name, queued.name, http.name) == ("mllp", "mllp-queued", "http")
    assert mllp.status == "ok", mllp.note
    assert mllp.extra["sent"] == 5 and sum(mllp.extra["answers"].values()) == 5
    assert mllp.extra["answers"].get("AA", 0) >= 1 and mllp.items == mllp.extra["answers"].get("AA", 0) + \
        sum(v for k, v in mllp.extra["answers"].items() if k not in ("AA", "unanswered"))
    assert len(mllp.latencies_ms) == 5 and mllp.p99_ms is not None
    # answered on receipt (the bench's messages ask for enhanced mode: CA), then every one stored by the queue reader
    assert queued.status == "ok", queued.note
    assert queued.extra["ack"] == "received" and queued.extra["answers"] == {"CA": 5}
    assert queued.extra["stored"] == 5 and queued.extra["still_queued"] == 0 and queued.extra["drained_s"] > 0
    assert "all 5 stored" in queued.note
    assert "a queue reader recording 3 per transaction" in queued.note and "recording" not in mllp.note
    assert http.status == "ok", http.note
    assert http.extra["statuses"] == {200: 4} and http.items == 4 and len(http.latencies_ms) == 4
    assert http.extra["server_cpu_s"] >= 0
    # both servers wrote where the run said, and were stopped: their logs are complete files
    assert all((tmp_path / f"{name}-server.log").exists() for name in ("mllp", "mllp-queued", "http"))
    assert (tmp_path / "mllp" / "gateway.db").exists() and (tmp_path / "http" / "gateway.db").exists()
