"""The fleet commands' one table formatter, through the rows of each command (no broker needed)."""

from __future__ import annotations

import io

from edge_agent.fleet import bench as fleet_bench
from edge_agent.fleet import deploy as fleet_deploy
from edge_agent.fleet.client import Answer
from edge_agent.fleet.table import format_table

SHA = "ab" * 32


def test_columns_align_missing_values_dash_and_failures_carry_their_reason():
    rows = [{"device": "pi-1", "status": "done", "ms": 12.345, "n": 3},
            {"device": "pi-long-name", "status": "timeout", "ms": None, "n": None, "reason": "no answer in 5 s"}]
    assert format_table(rows, ["device", "status", ("ms", "time ms"), "n"]).splitlines() == [
        "device        status   time ms  n",
        "pi-1          done     12.35    3",
        "pi-long-name  timeout  -        -  (no answer in 5 s)",
    ]
    assert format_table(rows[:1], ["device", ("ms", "ms")], digits=1).splitlines()[1] == "pi-1    12.3"


def test_header_only_when_no_rows():
    assert format_table([], ["device", ("p50_ms", "p50 ms")]) == "device  p50 ms"


def test_deploy_report_table_and_exit_code():
    answers = {"dev-1": Answer("dev-1", "done", final={"state": "active", "name": "dm05", "sha256": SHA,
                                                       "running": SHA}),
               "dev-2": Answer("dev-2", "rejected", "sha256 mismatch", final={})}
    out = io.StringIO()
    assert fleet_deploy.report_deploy_answers(answers, out) == 1
    assert out.getvalue().splitlines() == [
        "device  status    state   model  sha256        running",
        "dev-1   done      active  dm05   abababababab  abababababab",
        "dev-2   rejected  -       -      -             -  (sha256 mismatch)",
    ]
    out = io.StringIO()
    assert fleet_deploy.report_deploy_answers({}, out) == 1 and out.getvalue() == "no device answered\n"


def test_models_report_lists_each_stored_model():
    answers = {"dev-1": Answer("dev-1", "done", final={"models": [
        {"role": "active", "name": "dm05", "sha256": SHA, "size": 1024, "deployed_at": None},
        {"pending": True, "name": "dm10", "sha256": SHA, "size": 2048}]})}
    out = io.StringIO()
    assert fleet_deploy.report_model_answers(answers, out) == 0
    lines = out.getvalue().splitlines()
    assert lines[0] == "device  status  role     name  sha256        size  deployed"
    assert lines[1] == "dev-1   done    active   dm05  abababababab  1024  -"
    assert lines[2] == "dev-1   done    pending  dm10  abababababab  2048  -"


def test_bench_rows_print_times_with_two_decimals():
    report = {"devices": {"pi-1": {"status": "done", "reason": None, "result": {
        "model": {"name": "m"}, "runtime": "litert", "runtime_version": "2.3.0", "delegate": None,
        "threads": 2, "fps": 20.0, "invoke": {"count": 3, "p50": 49.994, "p90": 50.5, "p99": 51.0}}}}}
    lines = format_table(fleet_bench.summary_rows(report), fleet_bench.TABLE_COLUMNS).splitlines()
    assert lines == [
        "device  status  model  runtime       delegate  threads  runs  p50 ms  p90 ms  p99 ms  fps",
        "pi-1    done    m      litert 2.3.0  cpu       2        3     49.99   50.50   51.00   20.00",
    ]
