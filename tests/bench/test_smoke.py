"""The benchmarks still run (tiny sizes); their timings are not asserted."""

from bench import core


def test_core_benchmarks_run_quick(capsys):
    core.main(["--quick"])
    out = capsys.readouterr().out
    assert "steps/ours" in out and "search" in out


def test_service_benchmarks_run_quick(capsys):
    from bench import service

    service.main(["--quick"])
    out = capsys.readouterr().out
    assert "receive_MB_s" in out and "p99_ms" in out and "per_prior_ratio" in out
    assert "request/one_shot" in out


def test_format_benchmarks_run_quick(capsys):
    from bench import formats

    formats.main(["--quick"])
    out = capsys.readouterr().out
    for word in ("speedup", "peak_memory_over_covariance", "read_factor_", "kron", "routes"):
        assert word in out


def test_search_benchmarks_run_quick(capsys):
    from bench import search

    search.main(["--quick"])
    out = capsys.readouterr().out
    for word in ("cost/greedy", "cost/best_of_random", "plan/one_shot", "cold/one_shot", "diag"):
        assert word in out


def test_gpu_benchmark_runs_quick_on_the_cpu(capsys):
    from bench import gpu

    gpu.main(["--quick", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "numpy/device" in out and "device/one_shot" in out


def test_network_benchmarks_run_quick(capsys):
    from bench import networks

    networks.main(["--quick"])
    out = capsys.readouterr().out
    for word in ("plan/one_shot", "cost/space_by_space", "diag", "peak_over_posterior"):
        assert word in out


def test_interleaved_best_takes_each_minimum_in_turn():
    from itertools import count

    from bench.common import interleaved_best

    order, ticks = [], count()

    def a():
        order.append("a")
        return next(ticks)

    def b():
        order.append("b")
        return "b"

    (ta, last_a), (tb, last_b) = interleaved_best([a, b], repeat=3)
    assert order == ["a", "b"] * 3
    assert (last_a, last_b) == (2, "b")
    assert 0 <= ta < 1 and 0 <= tb < 1
