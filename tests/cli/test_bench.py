"""``oncoscope bench`` (oncoscope/bench/command.py, which the CLI names only by string)."""

import json

import pytest
from click.testing import CliRunner

from oncoscope.cli import main


@pytest.mark.slow
def test_bench_json_without_baselines():
    res = CliRunner().invoke(main, ["bench", "--json", "--no-baselines", "--runs", "10"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output.strip().splitlines()[-1])
    assert out["full_analysis"]["p50_ms"] > 0
    assert out["memory"]["peak_rss_mb"] > 0 and out["memory"]["torch_imported"] is False
    assert out["compute"]["classifier_gflops"] > 0 and out["compute"]["matmul_gflops_per_s"] > 0
