"""Plots of one or more training runs from their metrics.jsonl and checkpoints (the command line
is tools/plot_run.py; the studies call `plot_runs`).

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]

Writes into --out (default: one run's own `plots/`; a comparison of several runs goes to a new
folder, runs/plots/RUN_A-vs-RUN_B..., never into a run's own plots):
  mixture.png      scheduled weight (dashed) vs the share of each global batch (solid) per source,
                   in the unit the run mixes by (data.mix_by); schedule changes marked at their
                   step (accepted: solid vertical line, rejected: dotted)
  train_loss.png   training loss per source (the batch loss split by each sample's source)
  valid_loss.png   validation loss per source
  summary.md       per run: steps, tokens per source, first/last loss, last validation loss, schedule
Several runs share each axis, one colour per run; a panel lists only the runs that have a line
in it, and the legends sit below the panels, clear of the lines.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from megatron_code.training.run_summary import read_events, read_metrics, series, summarize


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _figure(runs: dict[str, list[dict]], prefix: str, title: str, ylabel: str, path: Path,
            scheduled: bool = False, window: int = 1, events: dict[str, list[dict]] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({name for records in runs.values() for name in series(records, prefix)})
    fig, axes = plt.subplots(1, max(len(sources), 1), figsize=(5 * max(len(sources), 1), 3.6), squeeze=False)
    for ax, source in zip(axes[0], sources):
        for colour, (label, records) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"] * 8, runs.items()):
            unit = records[0].get("mix_by", "samples") if scheduled and records else prefix
            steps, values = series(records, unit).get(source, ([], []))
            if not steps:  # this run has no such source (NL has no code): no line, no legend entry
                continue
            if scheduled:
                totals = {r["step"]: sum(v for k, v in r.items() if k.startswith(unit + "/")) for r in records}
                values = [v / max(totals[s], 1) for s, v in zip(steps, values)]
                w_steps, weights = series(records, "weight").get(source, ([], []))
                ax.plot(w_steps, weights, "--", color=colour, label=f"{label} scheduled")
                for verdict, style in (("accepted", "-"), ("rejected", ":")):
                    marks = [e["step"] for e in (events or {}).get(label, []) if e.get("verdict") == verdict]
                    for i, step in enumerate(marks):
                        ax.axvline(step, color=colour, linestyle=style, linewidth=1, alpha=0.6,
                                   label=f"{label} schedule {verdict}" if i == 0 else None)
            ax.plot(steps, _smooth(values, window), color=colour, label=label + (" actual" if scheduled else ""))
        ax.set_title(f"{title}: {source}")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.legend(fontsize="x-small", loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _markdown(summaries: list[dict]) -> str:
    lines = ["# Run summary", "", "| run | steps | tokens per source | train loss first -> last | valid loss |",
             "|---|---|---|---|---|"]
    for s in summaries:
        tokens = ", ".join(f"{k} {v:,}" for k, v in s["tokens"].items())
        loss = (f"{s['first_loss']:.3f} -> {s['last_loss']:.3f}" if s["first_loss"] is not None else "-")
        valid = ", ".join(f"{k} {v:.3f}" for k, v in s["valid_loss"].items()) or "-"
        lines.append(f"| {s['run_dir']} | {s['step']} | {tokens or '-'} | {loss} | {valid} |")
    for s in summaries:
        if s["schedule"]:
            lines += ["", f"## Schedule of {s['run_dir']}", ""]
            for p in s["schedule"]:
                mix = ", ".join(f"{n} {w:.3f}" for n, w in p["weights"].items() if w > 0)
                ramp = f" (ramp over {p['ramp']} steps)" if p.get("ramp") else ""
                lines.append(f"- from step {p['start']}: {mix}{ramp}")
    return "\n".join(lines) + "\n"


def _labels(run_dirs: list[Path]) -> list[str]:
    """Each run's folder name, or its whole path where two runs share a name."""
    return [d.name if [r.name for r in run_dirs].count(d.name) == 1 else str(d) for d in run_dirs]


def default_out(run_dirs: list[Path]) -> Path:
    """One run: its own plots/. Several: a folder of their own under runs/plots/, named by the runs,
    so a comparison never replaces a run's own plots."""
    if len(run_dirs) == 1:
        return run_dirs[0] / "plots"
    name = "-vs-".join(label.strip("/").replace("/", "_") for label in _labels(run_dirs))
    return Path("runs") / "plots" / name


def plot_runs(run_dirs: list[Path], out: Path) -> list[Path]:
    runs, events = {}, {}
    for run_dir, label in zip(run_dirs, _labels(run_dirs)):
        records = read_metrics(run_dir)
        if not records:
            raise SystemExit(f"error: {run_dir}/metrics.jsonl is missing or empty: not a training run directory")
        runs[label], events[label] = records, read_events(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    longest = max(len(r) for r in runs.values())
    written = [out / "mixture.png", out / "train_loss.png", out / "valid_loss.png", out / "summary.md"]
    units = sorted({r[0].get("mix_by", "samples") for r in runs.values()})
    _figure(runs, "samples", "mixture", f"share of {' / '.join(units)}", written[0], scheduled=True,
            window=max(1, longest // 20), events=events)
    _figure(runs, "loss", "training loss", "loss", written[1], window=max(1, longest // 50))
    _figure(runs, "valid_loss", "validation loss", "loss", written[2])
    written[3].write_text(_markdown([summarize(d) for d in run_dirs]))
    return written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, help="output folder (default: RUN_DIR/plots for one run; "
                                                   "runs/plots/RUN_A-vs-RUN_B... for several)")
    args = parser.parse_args(argv)
    out = args.out or default_out(args.run_dirs)
    written = plot_runs(args.run_dirs, out)
    what = "plots of " + (str(args.run_dirs[0]) if len(args.run_dirs) == 1 else f"{len(args.run_dirs)} runs compared")
    print(f"{what} written to {out}/: " + ", ".join(p.name for p in written))

