"""The source tree never shadows an installed distribution: from the repository root (which
`python -m ...` and pytest put first on sys.path), `import kernels` is the PyPI package that
transformers imports at start-up, not our kernel folder, and transformers builds a model."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import kernels, pathlib, sys
from transformers import LlamaConfig, LlamaForCausalLM
model = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1))
repo = pathlib.Path(sys.argv[1]).resolve()
where = [str(pathlib.Path(p).resolve()) for p in (getattr(kernels, "__path__", None) or [kernels.__file__])]
assert not any(w.startswith(str(repo / "kernels")) for w in where), f"import kernels found our folder: {where}"
print(sum(p.numel() for p in model.parameters()))
"""


def test_transformers_and_its_kernels_package_import_from_the_repository_root():
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert int(done.stdout.split()[-1]) > 0


def test_our_kernels_install_as_megatron_code_kernels_from_any_folder(tmp_path):
    for cwd in (REPO, tmp_path):
        done = subprocess.run([sys.executable, "-c", "from megatron_code.kernels.ops import build_ops; "
                               "from megatron_code.kernels import rms_norm; print(rms_norm.__name__)"],
                              cwd=cwd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0 and done.stdout.strip() == "megatron_code.kernels.rms_norm", done.stderr[-2000:]
