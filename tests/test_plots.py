"""Run plots (training/plots.py, tools/plot_run.py) and the study's scores plot: a comparison of
several runs goes to a folder of its own, never over a run's own plots; a panel lists only the
runs that have a line in it; every legend sits outside its axes; score bars are on the 0-1 scale
with their 95% bootstrap intervals as error bars."""
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def _write_run(run_dir: Path, sources: dict[str, float], steps: int = 20) -> Path:
    """A run's metrics.jsonl as the trainer writes it (no checkpoint needed to plot)."""
    run_dir.mkdir(parents=True)
    total = sum(sources.values())
    records = []
    for step in range(1, steps + 1):
        record = {"step": step, "loss": 5.0 - step / steps}
        for name, weight in sources.items():
            record.update({f"samples/{name}": round(8 * weight / total), f"weight/{name}": weight / total,
                           f"loss/{name}": 5.0 - step / steps + len(name) / 10, f"tokens/{name}": 1024})
            if step % 10 == 0:
                record[f"valid_loss/{name}"] = 4.5
        records.append(record)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir


@pytest.fixture
def saved_figures(monkeypatch):
    """Every figure saved during the test, still open for inspection."""
    figures = {}
    save = Figure.savefig

    def record(self, path, *args, **kwargs):
        figures[Path(path).name] = self
        return save(self, path, *args, **kwargs)
    monkeypatch.setattr(Figure, "savefig", record)
    return figures


def _legend_clear_of_axes(fig: Figure, ax) -> bool:
    renderer = FigureCanvasAgg(fig).get_renderer()  # the figure was closed after saving
    legend, area = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    return not legend.overlaps(area)


def test_comparing_runs_writes_a_folder_of_its_own(tmp_path, monkeypatch, capsys):
    from megatron_code.training.plots import main

    nl = _write_run(tmp_path / "NL", {"text": 1.0})
    code = _write_run(tmp_path / "CODE", {"text": 2.0, "code": 1.0})
    own = nl / "plots"
    own.mkdir()
    (own / "mixture.png").write_bytes(b"NL's own plot")
    monkeypatch.chdir(tmp_path)
    main([str(nl), str(code)])
    assert (own / "mixture.png").read_bytes() == b"NL's own plot" and sorted(p.name for p in own.iterdir()) == [
        "mixture.png"]
    out = Path("runs/plots/NL-vs-CODE")
    assert sorted(p.name for p in out.iterdir()) == ["mixture.png", "summary.md", "train_loss.png", "valid_loss.png"]
    assert capsys.readouterr().out.strip() == (f"plots of 2 runs compared written to {out}/: mixture.png, "
                                               "train_loss.png, valid_loss.png, summary.md")
    main([str(nl)])  # one run: its own plots/, as before
    assert (own / "mixture.png").read_bytes()[:4] == b"\x89PNG"
    main([str(nl), str(code), "--out", str(tmp_path / "chosen")])
    assert (tmp_path / "chosen" / "summary.md").is_file()


def test_a_panel_lists_only_runs_with_a_line_and_legends_sit_outside(tmp_path, saved_figures):
    from megatron_code.training.plots import plot_runs

    nl = _write_run(tmp_path / "NL", {"text": 1.0})
    code = _write_run(tmp_path / "CODE", {"text": 2.0, "code": 1.0})
    plot_runs([nl, code], tmp_path / "out")
    for name, fig in saved_figures.items():
        for ax in fig.axes:
            labels = [t.get_text() for t in ax.get_legend().get_texts()]
            drawn = [line.get_label() for line in ax.get_lines() if len(line.get_xdata())]
            assert labels == drawn, (name, ax.get_title())
            assert _legend_clear_of_axes(fig, ax), (name, ax.get_title())
            if ax.get_title().endswith(": code"):  # NL has no code: no line, no entry
                assert not any(label.startswith("NL") for label in labels) and labels, (name, labels)


def test_scores_plot_one_scale_error_bars_and_a_clear_legend(tmp_path, saved_figures):
    from megatron_code.evaluation.results import TaskScores, bootstrap_interval, write_results
    from megatron_code.study import _plot_scores

    rng = np.random.default_rng(0)
    accuracy = rng.integers(0, 2, 40).astype(float).tolist()
    bleu = rng.uniform(0, 1, 40).tolist()
    new = write_results(tmp_path / "CC.json", "runs/CC", 6, [
        TaskScores.from_items("logic", "multiple_choice", [str(i) for i in range(40)], {"acc": accuracy}),
        TaskScores.from_items("python_functions", "code", [str(i) for i in range(40)], {"bleu": bleu})])
    old = json.loads(new.read_text())  # as written before the scale was recorded: BLEU on 0-100
    del old["score_scale"]
    for row in old["results"]:
        if row["metric"] == "bleu":
            row["value"] *= 100
    old["items"]["python_functions"]["values"]["bleu"] = [100 * v for v in bleu]
    (tmp_path / "NN.json").write_text(json.dumps(old))

    _plot_scores({"NN": tmp_path / "NN.json", "CC": new}, tmp_path / "scores.png")
    fig = saved_figures["scores.png"]
    (ax,) = fig.axes
    assert _legend_clear_of_axes(fig, ax)
    assert ax.get_ylim() == (0, 1) and "0-1" in ax.get_ylabel()
    bar_groups = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert len(bar_groups) == 2
    for bars in bar_groups:
        heights = [bar.get_height() for bar in bars]
        assert heights == pytest.approx([np.mean(accuracy), np.mean(bleu)])  # the old file's BLEU read as /100
        (caps_and_lines,) = bars.errorbar.lines[2]
        spans = [value for segment in caps_and_lines.get_segments() for value in segment[:, 1]]
        expected = [bootstrap_interval(accuracy), bootstrap_interval(bleu)]  # checked against scipy elsewhere
        assert spans == pytest.approx([bound for _, low, high in expected for bound in (low, high)])
