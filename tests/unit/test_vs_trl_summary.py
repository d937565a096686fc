"""benchmarks/vs_trl.py: its run order, cache folders, summary and report, on hand-made run records."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_scripts import load_benchmark


def _run(tool: str, repeat: int, train_s: float, process_s: float) -> dict:
    return {"tool": tool, "repeat": repeat, "train_s": train_s, "process_s": process_s, "samples": 48}


@pytest.fixture(scope="module")
def vs_trl():
    return load_benchmark("vs_trl")


def test_schedule_keeps_the_variants_after_every_trl_and_stock_run(vs_trl) -> None:
    order = vs_trl.schedule(3, ["compile", "bf16"])
    assert order[:6] == [(0, "trl"), (0, "dpok"), (1, "dpok"), (1, "trl"), (2, "trl"), (2, "dpok")]
    assert order[6:] == [(0, "compile"), (0, "bf16"), (1, "bf16"), (1, "compile"), (2, "compile"), (2, "bf16")]
    assert vs_trl.schedule(2, []) == [(0, "trl"), (0, "dpok"), (1, "dpok"), (1, "trl")]


def test_each_compiling_variant_gets_a_cache_folder_of_its_own(vs_trl, monkeypatch) -> None:
    monkeypatch.setitem(vs_trl.VARIANTS, "compile-bf16", ("--compile", "--autocast", "bf16"))
    tmp = Path("t")
    assert vs_trl.inductor_dir(tmp, "compile") != vs_trl.inductor_dir(tmp, "compile-bf16")
    assert vs_trl.inductor_dir(tmp, "bf16") is None
    assert vs_trl.inductor_dir(tmp, "") is None


def test_summary_takes_a_compiling_variants_warm_repeats_and_its_cold_one_apart(vs_trl) -> None:
    runs = [_run("trl", r, 24.0, 30.0) for r in range(3)]
    runs += [_run("dpok", r, s, 40.0) for r, s in enumerate((20.0, 16.0, 12.0))]
    # the compiling variant: repeat 0 pays the compilation; listed out of order, and its fastest
    # repeat is not the cold one
    runs += [_run("dpok+compile", 2, 8.0, 16.0), _run("dpok+compile", 0, 48.0, 60.0), _run("dpok+compile", 1, 12.0, 24.0)]
    runs += [_run("dpok+bf16", r, s, 48.0) for r, s in enumerate((6.0, 24.0, 48.0))]
    s = vs_trl.summarise(runs)
    assert s["trl"] == pytest.approx({"train": 2.0, "process": 1.6})
    assert s["dpok"]["train"] == pytest.approx(3.0)  # median of 2.4, 3, 4
    assert s["ratio"] == pytest.approx({"train": 1.5, "process": 1.2 / 1.6})
    # warm: the median of repeats 1 and 2 (4 and 6 samples/s), not of all three
    assert s["dpok+compile"] == pytest.approx({"train": 5.0, "process": 2.5})
    assert s["ratio:dpok+compile"] == pytest.approx({"train": 2.5, "process": 2.5 / 1.6})
    assert s["cold:dpok+compile"] == pytest.approx({"train": 1.0, "process": 0.8})
    # a variant that does not compile: every repeat counts, no cold run
    assert s["dpok+bf16"]["train"] == pytest.approx(2.0)
    assert "cold:dpok+bf16" not in s and "cold:dpok" not in s


def test_report_row_of_each_variant(vs_trl, tmp_path: Path) -> None:
    runs = [_run("trl", r, 24.0, 30.0) for r in range(3)] + [_run("dpok", r, 16.0, 40.0) for r in range(3)]
    runs += [_run("dpok+compile", 0, 48.0, 60.0), _run("dpok+compile", 1, 12.0, 24.0), _run("dpok+compile", 2, 8.0, 16.0)]
    runs += [_run("dpok+bf16", r, 24.0, 48.0) for r in range(3)]
    settings = {"repeats": 3, "rounds": 3, "samples": 16, "prompt": "two white triangles", "batch": 8, "steps": 20,
                "guidance": 5.0, "eval_images": 4}
    data = {"cpu": "a CPU", "threads": 2, "torch": "2", "settings": settings, "summary": vs_trl.summarise(runs)}
    vs_trl.write_report([data, {**data, "cpu": "another CPU"}], tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "## a CPU" in text and "## another CPU" in text and "`docs/vs_trl/another-cpu.json`" in text
    assert "| training phases (sample, reward, update) | 2.000 | 3.000 | 1.50x |" in text
    assert "| `--compile` | 5.000 | 2.50x | 2.500 | 1.56x | 0.50x | 0.50x |" in text
    assert "| `--autocast bf16` | 2.000 | 1.00x | 1.000 | 0.62x | — | — |" in text
    # stock only: no variant section
    data["summary"] = vs_trl.summarise(runs[:6])
    vs_trl.write_report([data], tmp_path / "s.md")
    assert "speed option" not in (tmp_path / "s.md").read_text()


def test_each_kind_of_cpu_keeps_a_raw_file_of_its_own(vs_trl) -> None:
    assert vs_trl.raw_name("AMD EPYC, with AVX-512") == "amd-epyc-with-avx-512.json"
    assert vs_trl.raw_name("Intel(R) Xeon(R) Processor, without AVX-512") == "intel-r-xeon-r-processor-without-avx-512.json"
