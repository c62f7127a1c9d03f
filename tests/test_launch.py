"""The launch examples run as written: each launcher passes `bash -n`, and every example command
(in the launchers' headers and the README) is executed with stand-ins for torchrun, srun,
sbatch, scontrol and nvidia-smi that record what they are given. The torchrun command line
the launcher builds is parsed by torch's own torchrun parser, and its training arguments are
validated for the world size it launches, as `megatron_code.train` does at start-up."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch.distributed.run import config_from_args, get_args_parser

from megatron_code.train import checked_config

REPO = Path(__file__).resolve().parent.parent
LAUNCHERS = sorted((REPO / "examples" / "launch").iterdir())
GPUS_PER_NODE = 8
"""What the examples assume of a GPU node."""

# Stand-ins, each a Python script: they record their arguments (and the environment srun passes
# on) as JSON under $LAUNCH_RECORDS, then do what the real tool would do next.
STAND_INS = {
    "torchrun": """
record("torchrun", sys.argv[1:])
""",
    "srun": """
record("srun", {"args": sys.argv[1:], "SRUN_CPUS_PER_TASK": os.environ.get("SRUN_CPUS_PER_TASK"),
                "SLURM_CPUS_PER_TASK": os.environ.get("SLURM_CPUS_PER_TASK")})
command = sys.argv[1:]
while command[0].startswith("-"):  # srun's own options, all in --name=value form
    command = command[1:]
os.execvp(command[0], command)
""",
    "scontrol": """
assert sys.argv[1:3] == ["show", "hostnames"], sys.argv
print("\\n".join(os.environ["FAKE_HOSTS"].split()))
""",
    "nvidia-smi": f"""
print("\\n".join(f"GPU {{i}}: NVIDIA H100" for i in range({GPUS_PER_NODE})))
""",
    "sbatch": """
args, options = sys.argv[1:], {}
while args[0].startswith("-"):
    name, _, value = args.pop(0).lstrip("-").partition("=")
    options[name] = value
script, rest = args[0], args[1:]
for line in open(script):  # #SBATCH lines give what the command line does not
    if m := re.match(r"#SBATCH --([\\w-]+)=(\\S+)", line):
        options.setdefault(m[1], m[2])
nodes = int(options["nodes"])
env = dict(os.environ, SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES=str(nodes), SLURM_NNODES=str(nodes),
           SLURM_JOB_NODELIST=f"gpu[01-{nodes:02d}]", FAKE_HOSTS=" ".join(f"gpu{i:02d}" for i in range(1, nodes + 1)))
if "gpus-per-node" in options:
    env["SLURM_GPUS_ON_NODE"] = options["gpus-per-node"]
if "cpus-per-task" in options:
    env["SLURM_CPUS_PER_TASK"] = options["cpus-per-task"]
sys.exit(subprocess.run(["bash", script, *rest], env=env).returncode)
""",
}
PRELUDE = """import json, os, re, subprocess, sys
def record(name, value):
    with open(os.path.join(os.environ["LAUNCH_RECORDS"], name + ".json"), "w") as f:
        json.dump(value, f)
"""


def _commands(lines: list[str]) -> list[str]:
    """Shell commands, their backslash continuations joined."""
    out, current = [], ""
    for line in lines:
        current += line.rstrip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            out.append(current.strip())
            current = ""
    return out


def launcher_examples(path: Path) -> list[str]:
    """The example commands in a launcher's header comment (lines `#   ...`)."""
    lines = [line[1:] for line in path.read_text().splitlines() if line.startswith("#   ")]
    return [c for c in _commands(lines) if "examples/launch/" in c]


def readme_examples() -> list[str]:
    """README commands that launch training through a launcher or torchrun."""
    blocks = re.findall(r"```bash\n(.*?)```", (REPO / "README.md").read_text(), re.S)
    commands = _commands([line for block in blocks for line in block.splitlines() if not line.startswith("#")])
    return [c for c in commands if "examples/launch/" in c or c.startswith("torchrun ")]


EXAMPLES = [c for path in LAUNCHERS for c in launcher_examples(path)] + readme_examples()


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bin")
    for name, body in STAND_INS.items():
        path = folder / name
        path.write_text(f"#!{sys.executable}\n{PRELUDE}{body}")
        path.chmod(0o755)
    return folder


@pytest.mark.parametrize("launcher", LAUNCHERS, ids=lambda p: p.name)
def test_launcher_is_valid_bash_with_an_example(launcher):
    subprocess.run(["bash", "-n", str(launcher)], check=True)
    assert launcher_examples(launcher), f"{launcher.name} shows no example command"


@pytest.mark.parametrize("command", EXAMPLES)
def test_launch_example_builds_a_torchrun_command_that_validates(command, stand_ins, tmp_path, monkeypatch):
    records = tmp_path / "records"
    records.mkdir()
    env = {"PATH": f"{stand_ins}:/usr/bin:/bin", "HOME": str(tmp_path), "LAUNCH_RECORDS": str(records)}
    done = subprocess.run(["bash", "-c", command], cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    argv = json.loads((records / "torchrun.json").read_text())
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # config_from_args sets it when unset
    args = get_args_parser().parse_args(argv)
    launch, _, _ = config_from_args(args)
    assert args.module and args.training_script == "megatron_code.train"
    if "examples/launch/" in command:  # torchrun passes pre-emption signals on and lets the ranks save
        assert {"SIGTERM", "SIGUSR1"} <= set(args.signals_to_handle.split(",")) and args.shutdown_timeout >= 60
    nodes = launch.max_nodes
    if command.startswith("sbatch"):
        srun = json.loads((records / "srun.json").read_text())
        nodes_option = re.search(r"--nodes=(\d+)", command)
        assert nodes == int(nodes_option[1])
        assert srun["SRUN_CPUS_PER_TASK"] == srun["SLURM_CPUS_PER_TASK"]  # srun gets the CPUs sbatch asked for
        assert launch.rdzv_endpoint == "gpu01:29500" and launch.run_id == "4242"  # the first node; the job id
    if master := re.search(r"MASTER_ADDR=(\S+)", command):  # every node meets at MASTER_ADDR
        assert launch.rdzv_backend == "c10d" and launch.rdzv_endpoint == f"{master[1]}:29500"
    world_size = nodes * launch.nproc_per_node
    monkeypatch.chdir(REPO)  # the command's paths are the repository root's, where it ran
    config = checked_config(args.training_script_args, world_size)  # raises ConfigError naming the field
    assert config.parallel.data_parallel(world_size) >= 1
