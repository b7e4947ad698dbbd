"""The benchmarks still run (tiny sizes); their timings are not asserted."""

from bench import core


def test_core_benchmarks_run_quick(capsys):
    core.main(["--quick"])
    out = capsys.readouterr().out
    assert "steps/ours" in out and "search" in out
