"""The benchmark harness itself, fast: the load client against a real local HTTP server, the results
file's schema and table, --only, and the corrupt-files fault run (jobs.prepare on real broken files).

The slow runs (make bench, make load, make faults) are not run here; the faults they inject into Serve,
Train and generation are tested in test_serve.py, test_training.py and test_synthesis.py.
"""

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
from conftest import REPO

from bench import __main__ as bench_main
from bench import faults
from bench.client import Record, Req, percentile, run_load, summarize
from bench.common import PeakMemory, format_table, machine, row, validate, write_results


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the servers under test speak

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/fail":
            status, out = 503, b'{"error": "busy"}'
        elif self.path == "/flaky":  # every other request fails once: the client's retry recovers it
            self.server.calls += 1
            status, out = (500, b"{}") if self.server.calls % 2 else (200, b'{"label": "x"}')
        else:
            time.sleep(0.01)
            status, out = 200, b'{"label": "x", "n": %d}' % len(body)
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args):
        pass


@pytest.fixture
def http_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    server.calls = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", server
    server.shutdown()
    server.server_close()


def test_percentile_matches_linear_interpolation():
    assert percentile([], 50) is None
    assert percentile([7], 99) == 7
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile(range(1, 101), 99) == pytest.approx(99.01)
    assert percentile([5, 1, 3], 0) == 1 and percentile([5, 1, 3], 100) == 5


def test_summary_counts_only_the_window():
    recs = [Record(0.0, 0.5, 200, True), Record(0.5, 1.5, 200, True), Record(1.0, 2.0, 503, False, "busy"),
            Record(2.0, 2.2, 200, True), Record(2.5, 3.5, 200, True)]
    r = summarize(recs, 2, (1.0, 3.0), len(recs))
    assert (r.completed, r.ok, r.errors, r.errors_total) == (3, 2, 1, 1)
    assert r.rps == pytest.approx(1.0)
    assert r.p50_ms == pytest.approx(600.0) and r.statuses == {"200": 2, "503": 1}


def test_load_client_is_bounded_counts_and_drains(http_server):
    url, _ = http_server
    reqs = [Req("POST", "/ok", b"abc", {"Content-Type": "image/jpeg"})]
    t = time.perf_counter()
    r = run_load(url, reqs, concurrency=4, duration_s=30, max_requests=40, check=lambda s, b: s == 200 and b"label" in b)
    assert time.perf_counter() - t < 20  # the request bound ended it, not the 30 s
    assert r.sent == 40 and r.errors_total == 0 and r.ok == 40
    assert 10 <= r.p50_ms < 1000 and r.p99_ms >= r.p50_ms and r.rps > 0
    timed = run_load(url, reqs, concurrency=3, duration_s=1.0, warmup_s=0.3)
    assert timed.errors_total == 0 and 0.9 <= timed.window_s <= 1.5
    assert timed.ok < timed.sent  # warm-up answers are not counted


def test_load_client_counts_errors_retries_and_refuses_other_hosts(http_server):
    url, server = http_server
    bad = run_load(url, [Req("POST", "/fail")], concurrency=2, duration_s=5, max_requests=6)
    assert bad.errors_total == 6 and bad.ok == 0 and bad.statuses == {"503": 6} and "busy" in bad.sample_errors[0]
    server.calls = 0
    flaky = run_load(url, [Req("POST", "/flaky")], concurrency=1, duration_s=5, max_requests=5, retries=1)
    assert flaky.errors_total == 0 and all(rec.attempts == 2 for rec in flaky.records)
    with pytest.raises(ValueError, match="loopback"):
        run_load("http://192.0.2.1:80", [Req("GET", "/")], 1, 1)
    with pytest.raises(ValueError, match="loopback"):
        run_load("https://127.0.0.1:443", [Req("GET", "/")], 1, 1)


def test_results_file_schema_and_table(tmp_path):
    rows = [row("serve_rps_c32", 80.0, 40.0, "mlflow models serve", "req/s", size="tiny", ours_p50_ms=12.0,
                ours_p99_ms=30.0, baseline_p50_ms=20.0, baseline_p99_ms=60.0),
            row("train_peak_rss_mb", 900.0, 600.0, "plain PyTorch loop", "MB", better="lower", size="tiny"),
            row("generate_images_per_s", None, 1.0, "plain diffusers loop", "images/s")]
    assert rows[0]["ratio"] == 2.0 and rows[1]["ratio"] == 1.5 and rows[2]["ratio"] is None
    doc = {"machine": machine(), "rows": rows}
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"] and "gpu" in doc["machine"]
    path = write_results(doc, tmp_path / "results" / "latest.json")
    assert json.loads(path.read_text())["rows"][0]["name"] == "serve_rps_c32"
    table = format_table(rows)
    assert "serve_rps_c32" in table and "12/30" in table and "mlflow models serve" in table
    for broken in ({"rows": rows}, {"machine": doc["machine"], "rows": [{"name": "x"}]},
                   {"machine": doc["machine"], "rows": [{**rows[0], "ratio": 3.0}]}):
        with pytest.raises(ValueError):
            validate(broken)
    assert bench_main.check_targets(rows) == [
        "met    serve_rps_c32 [tiny]: ratio 2.00 (target >= 1.6x MLflow's throughput at c32, with a lower p99)"]
    slower = [{**rows[0], "ratio": 1.5}, {**rows[0], "ours_p99_ms": 90.0}]  # too few answers; a higher p99
    assert [line[:6] for line in bench_main.check_targets(slower)] == ["MISSED", "MISSED"]


def test_only_selects_rows_and_groups():
    assert bench_main.selection("serve_rps_c32") == {"serve": {"serve_rps_c32"}}
    assert bench_main.selection("train,generate_images_per_s")["train"] == set(bench_main.GROUPS["train"])
    assert set(bench_main.selection(None)) == {"serve", "train", "generate"}
    with pytest.raises(SystemExit, match="no such benchmark"):
        bench_main.selection("serve_rps_c64")


def test_peak_memory_follows_a_process_tree():
    import subprocess
    import sys

    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(1.5)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    with PeakMemory([proc.pid], interval_s=0.1) as mem:
        proc.wait(30)
    assert mem.peak_mb >= 200


def test_corrupt_files_dropped_into_a_data_set_lose_nothing(tmp_path):
    """The fault run of make faults: a clean phantom set, then the same with 7 kinds of broken files
    (some joining an existing patient) through jobs.prepare: every good image keeps its row, label and
    split; every broken file is skipped with its reason."""
    result = faults.corrupt_files(tmp_path, patients=16)
    assert result["ok"], result
    assert result["lost"] == 0 and result["skipped_with_reason"] == result["dropped"] == 7
    assert all(result["reasons"].values())
    assert "empty" in result["reasons"]["empty"] and "truncated" in result["reasons"]["truncated_jpeg"]
    assert "too large" in result["reasons"]["declares_60000x60000"]


def test_real_bench_figures_cross_fit_the_temperature_and_summarize_seeds():
    from bench import real

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 600)
    logits = rng.normal(0, 1, (600, 3))
    logits[np.arange(600), labels] += 2.0  # a fair classifier ...
    over = logits * 10                     # ... and the same, overconfident: temperature scaling fixes most
    fair, sharp = real.figures(logits, labels, ["a", "b", "c"]), real.figures(over, labels, ["a", "b", "c"])
    assert fair["accuracy"] == sharp["accuracy"] and fair["macro_f1"] == pytest.approx(sharp["macro_f1"])
    assert sharp["ece"] < 0.06 and set(fair["recall"]) == {"a", "b", "c"}
    from pneumoray import metrics
    raw = metrics.expected_calibration_error(metrics.softmax(over), labels)
    assert raw > 2 * sharp["ece"]
    row = real.summarize("x", {0: fair, 1: sharp})
    assert row["seeds"] == [0, 1] and row["accuracy"]["sd"] == 0.0
    assert row["ece"]["mean"] == pytest.approx((fair["ece"] + sharp["ece"]) / 2)
    assert set(row["recall"]) == {"a", "b", "c"} and "mean" in row["recall"]["a"]
    assert "± " in real.format_table([row])


def test_real_bench_pairs_the_synthetic_row_with_clip_lora_seed_by_seed():
    from bench import real

    def runs(*figures):
        return {seed: {"accuracy": a, "macro_f1": f} for seed, a, f in figures}

    without = runs((0, 0.80, 0.79), (1, 0.82, 0.80), (2, 0.78, 0.77))
    with_ = runs((2, 0.80, 0.77), (0, 0.81, 0.78), (1, 0.82, 0.82))
    d = real.paired(without, with_)  # by seed, whatever order the runs came in
    assert d["accuracy"]["per_seed"] == [0.01, 0.0, 0.02] and d["accuracy"]["mean"] == pytest.approx(0.01)
    assert d["macro_f1"]["per_seed"] == [-0.01, 0.02, 0.0] and d["macro_f1"]["sd"] == pytest.approx(0.015275, abs=1e-5)


def test_real_bench_without_data_names_the_flag(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "bench", "real", "--data", str(tmp_path / "none")], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "pass --data DIR" in proc.stderr
