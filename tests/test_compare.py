"""`lm-eval-dlmem compare`: reading lm-eval results files, the table, the plot, the errors.

The results files here are written in lm-eval 0.4.13's format (keys as `save_results_aggregated`
writes them); the end-to-end path from real tiny-model runs is in test_sweep.py.
"""

import json

import pytest

from lm_eval_dlmem.leaderboard import compare
from lm_eval_dlmem.leaderboard.plot import length_series, plot_lengths
from lm_eval_dlmem.leaderboard.results import (CorruptResultsError, NoResultsError, find_results_files, load_runs,
                                               split_length)


def write_results(path, model_args, scores, *, model="metastate-llada", date=1.0, limit=None, groups=None,
                  n=10):
    """scores: task -> {"metric,filter": value or (value, stderr)}."""
    results, hib, nsamp = {}, {}, {}
    for task, metrics in scores.items():
        entry = {"alias": (" - " + task) if groups and any(task in s for s in groups.values()) else task}
        for key, v in metrics.items():
            metric, filt = key.split(",")
            value, stderr = v if isinstance(v, tuple) else (v, "N/A")
            entry[key] = value
            entry[f"{metric}_stderr,{filt}"] = stderr
            hib.setdefault(task, {})[metric] = metric != "perplexity"
        results[task] = entry
        nsamp[task] = {"original": n, "effective": n}
    data = {"results": results, "group_subtasks": groups or {}, "configs": {}, "higher_is_better": hib,
            "n-samples": nsamp, "config": {"model": model, "model_args": model_args, "limit": limit},
            "date": date, "model_name": model_args.get("pretrained", "x")}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def two_runs(tmp_path):
    groups = {"dlmem_ruler_4k": ["dlmem_ruler_vt_4k"], "dlmem_ruler_8k": ["dlmem_ruler_vt_8k"]}
    base = {
        "dlmem_ruler_4k": {"score,none": 80.0}, "dlmem_ruler_8k": {"score,none": 60.0},
        "dlmem_ruler_vt_4k": {"score,none": (80.0, 2.5)}, "dlmem_ruler_vt_8k": {"score,none": (60.0, 3.0)},
        "t_mc": {"acc,none": (0.5, 0.1), "acc_norm,none": 0.25},
        "wikitext": {"perplexity,none": 20.0},
    }
    aug = {
        "dlmem_ruler_4k": {"score,none": 85.0}, "dlmem_ruler_8k": {"score,none": 70.0},
        "dlmem_ruler_vt_4k": {"score,none": (85.0, 2.0)}, "dlmem_ruler_vt_8k": {"score,none": (70.0, 2.0)},
        "t_mc": {"acc,none": (0.75, 0.1)},  # acc_norm missing in this run
        "wikitext": {"perplexity,none": 18.5},
        "t_gen": {"exact_match,strip": 1.0},  # only in this run
    }
    a = write_results(tmp_path / "frozen" / "tiny" / "results_2026-01-01T00-00-00.json",
                      {"pretrained": "tiny"}, base, groups=groups)
    b = write_results(tmp_path / "aug" / "tiny" / "results_2026-01-01T00-10-00.json",
                      {"pretrained": "tiny", "metastate": "ckpt"}, aug, groups=groups, date=2.0)
    return tmp_path / "frozen", tmp_path / "aug", a, b


def test_table_has_every_task_metric_with_stderr_and_deltas(two_runs):
    frozen, aug, _, _ = two_runs
    runs = compare.load_comparison([str(frozen), str(aug)])
    assert [r.label for r in runs] == ["frozen", "aug"]
    table = compare.markdown_table(runs)
    lines = {line.split("|")[1].strip() + "/" + line.split("|")[2].strip(): line for line in table.splitlines()[2:]}
    assert lines["t_mc/acc"].split("|")[5:8] == [" 0.5000 ± 0.1000 ", " 0.7500 ± 0.1000 ", " +0.2500 "]
    # a metric without stderr ("N/A" in the file) shows the value alone; missing cells are dashes
    assert lines["t_mc/acc_norm"].split("|")[5:8] == [" 0.2500 ", " — ", " — "]
    assert lines["t_gen/exact_match"].split("|")[3:8] == [" strip ", " ↑ ", " — ", " 1.0000 ", " — "]
    assert lines["wikitext/perplexity"].split("|")[4] == " ↓ "
    assert lines["wikitext/perplexity"].split("|")[7] == " -1.5000 "
    # a group's subtasks are indented under it
    assert "&nbsp;&nbsp;dlmem_ruler_vt_4k/score" in lines
    assert table.splitlines()[0] == "| Task | Metric | Filter |  | frozen | aug | Δ aug |"


def test_legend_names_the_differing_model_args_and_warns_on_uneven_samples(two_runs, tmp_path):
    frozen, aug, _, _ = two_runs
    other = write_results(tmp_path / "small" / "results_x.json", {"pretrained": "tiny", "metastate": "ckpt"},
                          {"t_mc": {"acc,none": 0.5}}, n=3)
    text = compare.report(compare.load_comparison([str(frozen), str(aug), str(other)], ["A", "B", "C"]))
    assert "- **A** (baseline): metastate-llada (pretrained=tiny)" in text
    assert "- **B**: metastate-llada (pretrained=tiny,metastate=ckpt)" in text
    assert "different numbers of samples for t_mc" in text


def test_labels_option_and_task_filter(two_runs):
    frozen, aug, a, _ = two_runs
    runs = compare.load_comparison([str(a), str(aug)], ["base", "mem"])
    table = compare.markdown_table(runs, task_pattern="^t_")
    assert "| base | mem | Δ mem |" in table.splitlines()[0]
    assert all(row.startswith("| t_") for row in table.splitlines()[2:])
    with pytest.raises(ValueError, match="2 run"):
        compare.load_comparison([str(frozen), str(aug)], ["only-one"])


def test_newest_file_wins_and_configs_split_into_runs(tmp_path):
    d = tmp_path / "out"
    write_results(d / "m" / "results_1.json", {"pretrained": "p"}, {"t": {"acc,none": 0.1}, "u": {"acc,none": 0.3}})
    write_results(d / "m" / "results_2.json", {"pretrained": "p"}, {"t": {"acc,none": 0.2}}, date=5.0)
    write_results(d / "m" / "results_3.json", {"pretrained": "p", "steps": 8}, {"t": {"acc,none": 0.9}}, date=3.0)
    (d / "m" / "samples_t_1.jsonl").write_text("{}\n")
    runs = load_runs(d)
    assert len(runs) == 2
    merged = next(r for r in runs if "steps" not in r.model_args)
    assert merged.scores["t"]["acc,none"].value == 0.2 and merged.scores["u"]["acc,none"].value == 0.3
    labelled = compare.load_comparison([str(d)])
    assert [r.label for r in labelled] == ["out:steps=None", "out:steps=8"]


def test_lm_eval_model_args_as_string_are_read(tmp_path):
    f = write_results(tmp_path / "r.json", {}, {"t": {"acc,none": 0.5}}, model="hf")
    data = json.loads(f.read_text())
    data["config"]["model_args"] = "pretrained=EleutherAI/pythia-70m,dtype=float32"
    f.write_text(json.dumps(data))
    (run,) = load_runs(f)
    assert run.model == "hf" and run.model_args == {"pretrained": "EleutherAI/pythia-70m", "dtype": "float32"}


def test_paths_without_results_give_clear_errors(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.json").write_text('{"a": 1}')
    with pytest.raises(NoResultsError, match="holds no lm-eval results file"):
        find_results_files(tmp_path / "empty")
    assert compare.main([str(tmp_path / "empty")]) == 2
    assert "holds no lm-eval results file" in capsys.readouterr().err
    assert compare.main([str(tmp_path / "missing")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_a_corrupt_or_truncated_results_file_is_named(tmp_path, capsys):
    d = tmp_path / "run"
    write_results(d / "m" / "results_2026-01-01T00-00-00.json", {"pretrained": "p"}, {"t": {"acc,none": 0.1}})
    newer = write_results(d / "m" / "results_2026-01-02T00-00-00.123456.json", {"pretrained": "p"},
                          {"t": {"acc,none": 0.9}}, date=2.0)
    newer.write_text(newer.read_text()[:40])  # killed while lm-eval wrote it
    with pytest.raises(CorruptResultsError, match=f"{newer} is corrupt or truncated"):
        load_runs(d)  # not the older file's 0.1, silently
    assert compare.main([str(d)]) == 2
    err = capsys.readouterr().err
    assert str(newer) in err and "holds no" not in err
    # the only file, or one named on the command line, or lm-eval's <stem>_<date>.json naming
    (d / "m" / "results_2026-01-01T00-00-00.json").unlink()
    assert compare.main([str(newer)]) == 2 and "is corrupt or truncated" in capsys.readouterr().err
    stem = tmp_path / "out" / "mine_2026-01-03T00-00-00.json"
    stem.parent.mkdir()
    stem.write_text("")
    with pytest.raises(CorruptResultsError, match="mine_2026-01-03T00-00-00.json is corrupt"):
        find_results_files(tmp_path / "out")
    # other unreadable JSON beside the results (not lm-eval's) is still skipped
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "notes.json").write_text("{")
    write_results(tmp_path / "ok" / "results_1.json", {"pretrained": "p"}, {"t": {"acc,none": 0.1}})
    assert len(find_results_files(tmp_path / "ok")) == 1


def test_cli_writes_markdown_and_png(two_runs, tmp_path, capsys):
    frozen, aug, _, _ = two_runs
    md, png = tmp_path / "cmp.md", tmp_path / "cmp.png"
    assert compare.main([str(frozen), str(aug), "--labels", "frozen,metastate", "--output", str(md),
                         "--plot", str(png)]) == 0
    out = capsys.readouterr().out
    assert "| frozen | metastate | Δ metastate |" in out and md.read_text() in out + "\n"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    # nothing to plot: the table still comes, the PNG is skipped with a note
    assert compare.main([str(frozen), "--plot", str(tmp_path / "none.png"), "--plot_tasks", "^t_"]) == 0
    assert "was not written" in capsys.readouterr().err and not (tmp_path / "none.png").exists()


def test_lengths_are_parsed_from_task_names_and_lm_eval_ruler_metrics(two_runs, tmp_path):
    assert split_length("dlmem_ruler_vt_4k") == ("dlmem_ruler_vt", 4096)
    assert split_length("dlmem_babilong_qa1_0k") == ("dlmem_babilong_qa1", 0)
    assert split_length("dlmem_ruler_32K") == ("dlmem_ruler", 32768)
    assert split_length("dlmem_babilong_qa1") is None and split_length("t_mc") is None
    frozen, aug, _, _ = two_runs
    runs = compare.load_comparison([str(frozen), str(aug)])
    series = length_series(runs)
    assert series["dlmem_ruler_vt (score)"] == {"frozen": {4096: 80.0, 8192: 60.0}, "aug": {4096: 85.0, 8192: 70.0}}
    assert set(series) == {"dlmem_ruler (score)", "dlmem_ruler_vt (score)"}
    upstream = write_results(tmp_path / "up.json", {"pretrained": "p"},
                             {"niah_single_1": {"4096,none": 100.0, "8192,none": 90.0}})
    up_runs = compare.load_comparison([str(upstream)])
    assert length_series(up_runs, pattern="")["niah_single_1"] == {"up": {4096: 100.0, 8192: 90.0}}
    assert plot_lengths(up_runs, str(tmp_path / "up.png"), pattern="") is True
