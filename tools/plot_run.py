"""Plot one or more training runs: scheduled vs actual mixture, per-source training and validation
loss, and a markdown summary (see megatron_code/training/plots.py).

    python tools/plot_run.py RUN_DIR [RUN_DIR ...] [--out DIR]   (several runs: runs/plots/A-vs-B/ by default)
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_code.cli import user_errors  # noqa: E402
from megatron_code.training.plots import main  # noqa: E402

if __name__ == "__main__":
    with user_errors():
        main()
