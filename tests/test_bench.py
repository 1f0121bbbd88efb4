"""``batchnorm.bench``: the quick benchmark runs end to end and its figures are self-consistent.

A smoke test: no assertion on speed, only on structure and sanity (times positive and finite,
ratios equal to the ratios of the times, memory figures non-negative and right for the copy floor,
case R's renorm table, JSON written and loadable, the tuned-allocator re-execution records its settings).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import pytest
import torch

from batchnorm.bench import (
    MODES,
    TRAINING_MODES,
    TUNED_MALLOC_ENV,
    add_arguments,
    benchmark,
    describe_environment,
    format_table,
    run,
)

TIME_KEYS = ("ours_ms", "torch_ms", "keras_ms", "copy_ms", "clone_ms", "ours_unmasked_ms", "ours_plain_ms")
MEMORY_KEYS = (
    "ours_peak_mib",
    "torch_peak_mib",
    "keras_peak_mib",
    "copy_peak_mib",
    "clone_peak_mib",
    "ours_unmasked_peak_mib",
    "ours_plain_peak_mib",
)
RATIOS = {
    "ours_over_torch": "torch_ms",
    "ours_over_keras": "keras_ms",
    "ours_over_copy": "copy_ms",
    "masked_over_unmasked": "ours_unmasked_ms",
    "renorm_over_plain": "ours_plain_ms",
}
# What stands in for torch where torch has no equivalent: ours unmasked (E), ours without renorm (R).
REFERENCES = {"E": "ours_unmasked_ms", "R": "ours_plain_ms"}
# Case R (B with renorm=True) runs in the training modes only.
ROWS = [(c, m) for c in "BEF" for m in MODES] + [("R", m) for m in TRAINING_MODES]


@pytest.fixture(scope="module")
def rows():
    return benchmark(cases="BEFR", modes=MODES, repeats=3, warmup=1, threads=1, quick=True, keras=True)


# Case C, small and fast: the bench options that the command-line tests share.
QUICK_C = "--quick --cases C --repeats 2 --warmup 0 --threads 1 --no-keras".split()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    add_arguments(parser)
    return parser


def test_one_row_per_case_and_mode_in_order(rows):
    assert [(r["case"], r["mode"]) for r in rows] == ROWS
    for row in rows:
        assert row["repeats"] == 3
        assert row["shape"] == [2, 16, 768]
        assert row["dtype"] == ("bfloat16" if row["case"] == "F" else "float32")
        assert row["masked"] is (row["case"] == "E")
        assert row["renorm"] is (row["case"] == "R") is ("renorm=True" in row["description"])


def test_times_are_positive_and_finite_where_present(rows):
    for row in rows:
        expected = {"ours_ms", "copy_ms", "clone_ms", "keras_ms"}  # Keras is a test dependency
        expected.add(REFERENCES.get(row["case"], "torch_ms"))
        present = {key for key in TIME_KEYS if row[key] is not None}
        assert present == expected, row["case"]
        for key in present:
            assert math.isfinite(row[key]) and row[key] > 0, (row["case"], row["mode"], key)
        for detail in row["detail"].values():
            assert len(detail["samples_ms"]) == 3
            assert all(math.isfinite(t) and t > 0 for t in detail["samples_ms"])
            assert detail["min_ms"] <= detail["median_ms"] <= detail["max_ms"]
            assert detail["calls_per_sample"] >= 1


def test_ratios_are_the_ratios_of_the_medians(rows):
    for row in rows:
        for ratio, denominator in RATIOS.items():
            if row[denominator] is None:
                assert row[ratio] is None
            else:
                assert row[ratio] == pytest.approx(row["ours_ms"] / row[denominator], rel=1e-12)
    masked = [r for r in rows if r["case"] == "E"]
    assert all(r["masked_over_unmasked"] is not None and r["ours_over_torch"] is None for r in masked)
    renorm = [r for r in rows if r["case"] == "R"]
    assert all(r["renorm_over_plain"] is not None and r["ours_over_keras"] is not None for r in renorm)
    assert all(r["ours_over_torch"] is None for r in renorm)


def test_copy_floor_is_shared_by_the_modes_of_a_case(rows):
    for case in "BEFR":
        case_rows = [r for r in rows if r["case"] == case]
        assert len({(r["copy_ms"], r["clone_ms"]) for r in case_rows}) == 1


def test_memory_figures(rows):
    for row in rows:
        for key in MEMORY_KEYS:
            assert row[key] is None or (math.isfinite(row[key]) and row[key] >= 0), key
        # The method's own check: a clone allocates exactly its output, copy_ allocates nothing.
        assert row["clone_peak_mib"] == pytest.approx(row["input_mib"])
        assert row["copy_peak_mib"] == 0
        # Every implementation returns a fresh output of the input's size.
        assert row["ours_peak_mib"] >= row["input_mib"]
        if row["mode"] == "training_backward":  # output and input gradient at least
            assert row["ours_peak_mib"] >= 2 * row["input_mib"]


def test_format_table_lists_every_row(rows):
    header = describe_environment(threads=1, repeats=3, warmup=1, quick=True, cases="BEFR")
    text = format_table(rows, header)
    assert "threads 1" in text and "allocator:" in text and "median of 3" in text
    assert "command:" in text
    data_lines = [line.split() for line in text.splitlines()]
    data_lines = [cells for cells in data_lines if cells[0] in ("B", "E", "F", "R") and cells[1] in ("infer", "train")]
    labels = {"inference": "infer fwd", "training": "train fwd", "training_backward": "train fwd+bwd"}
    assert [(cells[0], " ".join(cells[1:3])) for cells in data_lines] == [(c, labels[m]) for c, m in ROWS]
    assert "masked / unmasked" in text
    assert format_table(rows).count("\n") < text.count("\n")  # without the header lines


def test_renorm_table_has_a_line_per_training_mode(rows):
    lines = format_table(rows).splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("R with renorm=True"))
    assert lines[start + 1].split("  ")[0] == "mode" and "renorm/plain" in lines[start + 1]
    renorm_rows = [r for r in rows if r["renorm"]]
    for line, row in zip(lines[start + 2 : start + 4], renorm_rows, strict=True):
        assert line.startswith({"training": "train fwd ", "training_backward": "train fwd+bwd"}[row["mode"]])
        cells = line.split()[-5:]  # ours renorm, keras renorm, ours plain, renorm/keras, renorm/plain
        assert cells == [
            f"{row['ours_ms']:.3f}",
            f"{row['keras_ms']:.3f}",
            f"{row['ours_plain_ms']:.3f}",
            f"{row['ours_over_keras']:.2f}x",
            f"{row['renorm_over_plain']:.2f}x",
        ]
    assert lines[start + 4] == "target: renorm/plain <= 1.3x in training"
    assert "renorm" not in format_table(rows[:3])  # no R, no renorm table


def test_renorm_case_runs_in_the_training_modes_only():
    assert list(describe_environment(cases="BR", modes="inference")["cases"]) == ["B"]
    assert list(describe_environment(cases="BR", modes="training")["cases"]) == ["B", "R"]
    with pytest.raises(ValueError, match="R runs in training, training_backward"):
        benchmark(cases="R", modes=["inference"], quick=True, keras=False)
    assert _parser().parse_args([]).cases.endswith("R")  # in the default run


def test_command_line_run_writes_loadable_json(tmp_path, capsys):
    path = tmp_path / "sub" / "bench.json"
    args = _parser().parse_args(QUICK_C + ["--modes", "inference,training", "--json", str(path)])
    result = run(args)
    out = capsys.readouterr().out
    assert "train fwd" in out and "ours/torch" in out
    saved = json.loads(path.read_text())
    assert saved == json.loads(json.dumps(result))
    header = saved["header"]
    assert header["threads"] == 1 and header["repeats"] == 2 and header["quick"] is True
    assert header["torch"] == torch.__version__ and header["keras"] is None
    assert header["allocator"]["description"]
    assert header["elapsed_s"] > 0
    assert [(r["case"], r["mode"]) for r in saved["rows"]] == [("C", "inference"), ("C", "training")]
    assert all(r["keras_ms"] is None and r["ours_over_keras"] is None for r in saved["rows"])


def test_threads_are_restored():
    before = torch.get_num_threads()
    benchmark(cases="C", modes=["inference"], repeats=1, warmup=0, threads=1, quick=True, keras=False)
    assert torch.get_num_threads() == before


@pytest.mark.distributed  # re-executes the benchmark in a subprocess
def test_tuned_malloc_reruns_with_the_settings_recorded(tmp_path):
    path = tmp_path / "tuned.json"
    args = _parser().parse_args(["--tuned-malloc"] + QUICK_C + ["--modes", "training", "--json", str(path)])
    result = run(args)
    assert json.loads(path.read_text()) == result
    allocator = result["header"]["allocator"]
    assert allocator["env"] == TUNED_MALLOC_ENV
    assert allocator["description"].startswith("tuned malloc")
    assert all(f"{k}={v}" in result["header"]["command"] for k, v in TUNED_MALLOC_ENV.items())


def test_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        _parser().parse_args(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "--tuned-malloc" in text and "25% False" in text and "--json" in text
    assert "renorm=True (training only)" in text and "case R runs in the training modes only" in text


@pytest.mark.parametrize("argv", [["--cases", "BX"], ["--modes", "training,sideways"], ["--repeats", "0"]])
def test_bad_options_are_usage_errors(argv):
    with pytest.raises(SystemExit):
        _parser().parse_args(argv)


def test_bad_api_arguments_raise_value_error():
    with pytest.raises(ValueError, match="cases"):
        benchmark(cases="Z", quick=True, keras=False)
    with pytest.raises(ValueError, match="modes"):
        benchmark(cases="B", modes=["backward"], quick=True, keras=False)
    with pytest.raises(ValueError, match="repeats"):
        benchmark(cases="B", repeats=0, quick=True, keras=False)


def test_a_mode_samples_the_same_number_of_calls_each_after_an_untimed_one():
    # Two fake implementations of one mode, one 4x slower: both take the faster one's count, and
    # every timed sample follows one untimed call (warm-up and the memory probe call once each).
    from batchnorm import bench

    calls = {"fast": 0, "slow": 0}

    def entry(name: str, seconds: float) -> bench._Entry:
        def call() -> None:
            calls[name] += 1
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:  # busy: sleep() overshoots by a millisecond
                pass

        return bench._Entry("training", name, call, bench._nothing, call)

    entries = [entry("fast", 0.0003), entry("slow", 0.0012)]
    bench._measure_case(entries, repeats=3, warmup=2, min_sample_ms=3.0, device=torch.device("cpu"))
    per_sample = entries[0].calls_per_sample
    assert per_sample >= 2 and entries[1].calls_per_sample == per_sample
    for e in entries:
        assert e.calls == 3 * per_sample and len(e.samples_ms) == 3
        assert calls[e.impl] == 2 + 1 + 3 * (1 + per_sample)
