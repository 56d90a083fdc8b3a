"""launch/: the TPU VM and SLURM scripts (their --dry-run output and, with a fake gcloud, their real-mode flow)
and the Colab notebook (valid nbformat 4; its code cells run end to end on the CPU)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_VM = REPO / "launch" / "tpu_vm.sh"
SLURM = REPO / "launch" / "slurm_gpu.sbatch"
NOTEBOOK = REPO / "launch" / "colab.ipynb"
# Variables the scripts read defaults from; cleared so a developer's shell does not change the output.
SCRIPT_ENV_VARS = ("TPU_NAME", "ZONE", "PROJECT", "ACCELERATOR_TYPE", "TPU_VERSION", "SPOT", "WORKDIR", "BUCKET",
                   "PYTHON_VERSION", "JAXLM_REPO", "JAXLM_VENV", "PYTHON", "TMPDIR")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def recorder(bin_dir: Path, name: str, log: Path, script: str = "") -> Path:
  """An executable `name` in bin_dir that appends its argv (JSON) to `log`, then runs `script` (Python)."""
  bin_dir.mkdir(parents=True, exist_ok=True)
  path = bin_dir / name
  path.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                  f"with open({str(log)!r}, 'a') as f:\n  f.write(json.dumps([{name!r}] + sys.argv[1:]) + '\\n')\n"
                  + textwrap.dedent(script))
  path.chmod(0o755)
  return path


def calls(log: Path) -> list:
  return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def script_env(tmp_path: Path, **extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in SCRIPT_ENV_VARS and not k.startswith("SLURM_")}
  env["PATH"] = f"{tmp_path / 'bin'}{os.pathsep}{env.get('PATH', '')}"
  env["HOME"] = str(tmp_path / "home")
  env.update(extra)
  return env


def run_script(script: Path, *args, env: dict, check_rc: int | None = 0, cwd=None) -> subprocess.CompletedProcess:
  proc = subprocess.run(["bash", str(script), *args], env=env, cwd=cwd or REPO, capture_output=True, text=True,
                        timeout=120)
  if check_rc is not None:
    assert proc.returncode == check_rc, (proc.returncode, proc.stdout, proc.stderr)
  return proc


def commands(stdout: str) -> list:
  """The '+ ' lines of a --dry-run, each parsed back into its words."""
  return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def gcloud_tpu(cmds: list, verb: str) -> list:
  return [c for c in cmds if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == verb]


def option(cmd: list, name: str) -> str:
  """Value of `--name=value` or `--name value` in a parsed command."""
  for i, word in enumerate(cmd):
    if word.startswith(name + "="):
      return word.split("=", 1)[1]
    if word == name:
      return cmd[i + 1]
  raise AssertionError(f"{name} not in {cmd}")


@pytest.fixture
def fake_tools(tmp_path):
  """Fake gcloud, srun, sbatch, pip, python3 first on PATH: any call to them is recorded."""
  log = tmp_path / "calls.jsonl"
  for name in ("gcloud", "srun", "sbatch", "pip", "python3"):
    recorder(tmp_path / "bin", name, log)
  return log


# ------------------------------------------------------------------------------------------ tpu_vm.sh
def test_tpu_vm_dry_run_defaults(tmp_path, fake_tools):
  env = script_env(tmp_path)
  assert shutil.which("gcloud", path=env["PATH"]) == str(tmp_path / "bin" / "gcloud")
  proc = run_script(TPU_VM, "--dry-run", env=env)
  assert calls(fake_tools) == [], "--dry-run called a tool"
  assert all(line.startswith(("+ ", "# ")) for line in proc.stdout.splitlines()), proc.stdout
  cmds = commands(proc.stdout)

  (create,) = gcloud_tpu(cmds, "create")
  assert option(create, "--accelerator-type") == "v5litepod-16"
  assert option(create, "--version") == "v2-alpha-tpuv5-lite"
  assert option(create, "--zone") == "us-west4-a"
  assert "--spot" not in create and not any(w.startswith("--project") for w in create)
  name = create[5]
  assert name == "jaxlm-v5litepod-16"

  ssh = gcloud_tpu(cmds, "ssh")
  assert len(ssh) == 2 and all(c[5] == name and option(c, "--worker") == "all" for c in ssh)
  install, train = (option(c, "--command") for c in ssh)
  assert "jaxlm[tpu]" in install and "pip install" in install
  assert "python -m jaxlm.train --config configs/yinggem.py:tiny --workdir gs://" in train
  assert "gs://YOUR_BUCKET/jaxlm/yinggem-tiny" in train
  assert not gcloud_tpu(cmds, "delete")

  # The code goes to every worker: an archive of this checkout, copied with scp --worker=all, unpacked before
  # the install.
  (archive,) = [c for c in cmds if c[0] == "git"]
  assert archive[1:3] == ["-C", str(REPO)] and "archive" in archive and archive[-1] == "HEAD"
  (scp,) = gcloud_tpu(cmds, "scp")
  assert option(scp, "--worker") == "all" and scp[5] == option(archive, "-o")
  assert scp[6] == f"{name}:jaxlm.tar.gz" and "tar -xzf $HOME/jaxlm.tar.gz" in install
  order = [c[4] if c[0] == "gcloud" else c[0] for c in cmds]
  assert order == ["describe", "create", "git", "scp", "ssh", "ssh"], order


def test_tpu_vm_options_change_the_commands(tmp_path, fake_tools):
  proc = run_script(TPU_VM, "--dry-run", "--accelerator-type", "v4-16", "--config", "configs/hrom.py:tiny",
                    "--workdir", "gs://b/r", "--config.train.steps=5", "--config.train.sample_prompt", "it's so",
                    "--zone=us-central2-b", "--project", "my-proj", "--spot", "--name", "pod1", "--delete-after",
                    env=script_env(tmp_path))
  assert calls(fake_tools) == []
  cmds = commands(proc.stdout)
  (create,) = gcloud_tpu(cmds, "create")
  assert create[5] == "pod1" and option(create, "--accelerator-type") == "v4-16" and "--spot" in create
  assert option(create, "--version") == "tpu-ubuntu2204-base"
  gcloud_cmds = [c for c in cmds if c[0] == "gcloud"]
  assert all(option(c, "--zone") == "us-central2-b" and option(c, "--project") == "my-proj" for c in gcloud_cmds)
  train = option(gcloud_tpu(cmds, "ssh")[-1], "--command")
  assert ("python -m jaxlm.train --config configs/hrom.py:tiny --workdir gs://b/r --config.train.steps=5"
          in train)
  # The override survives both shells: the printed line, then the worker's.
  assert "--config.train.sample_prompt=it's so" in shlex.split(train.replace(";", " ; "))
  assert cmds[-1][4:] == ["delete", "pod1", "--zone=us-central2-b", "--project=my-proj", "--quiet"]


def test_tpu_vm_repo_install_and_delete(tmp_path, fake_tools):
  env = script_env(tmp_path)
  cmds = commands(run_script(TPU_VM, "--dry-run", "--repo", "https://example.com/jaxlm.git", "--ref", "v1",
                             env=env).stdout)
  assert not [c for c in cmds if c[0] == "git"] and not gcloud_tpu(cmds, "scp")
  install = option(gcloud_tpu(cmds, "ssh")[0], "--command")
  assert "git clone --depth=1 --branch v1 https://example.com/jaxlm.git" in install and "jaxlm[tpu]" in install

  cmds = commands(run_script(TPU_VM, "--dry-run", "--delete", "--name", "old", env=env).stdout)
  assert cmds == [["gcloud", "compute", "tpus", "tpu-vm", "delete", "old", "--zone=us-west4-a", "--quiet"]]

  detached = option(gcloud_tpu(commands(run_script(TPU_VM, "--dry-run", "--detach", env=env).stdout), "ssh")[-1],
                    "--command")
  assert "nohup python -m jaxlm.train" in detached and detached.rstrip().endswith("&")
  assert calls(fake_tools) == []


@pytest.mark.parametrize("args,batch", [
    ([], ["--config.train.batch_size=16", "--config.train.eval_batch_size=96"]),           # v5e-16: 16 chips
    (["--accelerator-type", "v4-16"], ["--config.train.batch_size=16", "--config.train.eval_batch_size=96"]),
    (["--accelerator-type", "v5litepod-64", "--config.train.batch_size", "128"],
     ["--config.train.batch_size=128", "--config.train.eval_batch_size=128"]),
    (["--accelerator-type", "v4-8"], ["--config.train.batch_size=12", "--config.train.eval_batch_size=96"]),
    (["--config", "configs/yinggem.py:tiny"], []),      # an explicit config: its own batch sizes
])
def test_tpu_vm_default_batch_fits_the_slice(tmp_path, fake_tools, args, batch):
  cmds = commands(run_script(TPU_VM, "--dry-run", *args, env=script_env(tmp_path)).stdout)
  train = shlex.split(option(gcloud_tpu(cmds, "ssh")[-1], "--command").replace(";", " ; "))
  overrides = [w for w in train if w.startswith("--config.")]
  assert overrides == batch


def test_tpu_vm_environment_defaults(tmp_path, fake_tools):
  env = script_env(tmp_path, TPU_NAME="envpod", ZONE="europe-west4-b", BUCKET="mybucket", SPOT="1",
                   ACCELERATOR_TYPE="v6e-8")
  cmds = commands(run_script(TPU_VM, "--dry-run", env=env).stdout)
  (create,) = gcloud_tpu(cmds, "create")
  assert create[5] == "envpod" and option(create, "--zone") == "europe-west4-b" and "--spot" in create
  assert option(create, "--version") == "v2-alpha-tpuv6e"
  assert "--workdir gs://mybucket/jaxlm/yinggem-tiny" in option(gcloud_tpu(cmds, "ssh")[-1], "--command")


@pytest.mark.parametrize("args,message", [
    (["--dry-run", "--bogus"], "unknown option '--bogus'"),
    (["--dry-run", "--zone"], "--zone needs a value"),
    (["--dry-run", "stray"], "unexpected argument 'stray'"),
    (["--dry-run", "--accelerator-type", "x9-8"], "pass --version"),
    ([], "set BUCKET"),                       # a real run without a bucket stops before any gcloud call
])
def test_tpu_vm_usage_errors(tmp_path, fake_tools, args, message):
  proc = run_script(TPU_VM, *args, env=script_env(tmp_path), check_rc=2)
  assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
  assert calls(fake_tools) == []


def test_tpu_vm_help():
  proc = subprocess.run(["bash", str(TPU_VM), "--help"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: tpu_vm.sh")
  for flag in ("--name", "--zone", "--project", "--accelerator-type", "--version", "--spot", "--workdir",
               "--delete", "--dry-run", "--repo", "TPU_NAME", "BUCKET", "resume"):
    assert flag in proc.stdout, flag


FAKE_GCLOUD = """
state_file = os.environ["FAKE_TPU_STATE"]
verb = sys.argv[4] if len(sys.argv) > 4 else ""
state = open(state_file).read() if os.path.exists(state_file) else ""
if verb == "describe":
  if not state:
    sys.exit("ERROR: NOT_FOUND")
  print(state)
elif verb == "create":
  open(state_file, "w").write("READY")
elif verb == "delete":
  os.remove(state_file)
elif verb == "scp":
  import tarfile
  with tarfile.open(sys.argv[5]) as archive:
    open(state_file + ".shipped", "w").write("\\n".join(archive.getnames()))
elif verb == "ssh" and "jaxlm.train" in " ".join(sys.argv) and os.path.exists(state_file + ".preempt"):
  os.remove(state_file + ".preempt")
  open(state_file, "w").write("PREEMPTED")
  sys.exit(255)
"""


def test_tpu_vm_real_mode_recreates_a_preempted_slice(tmp_path):
  """Without --dry-run (gcloud faked): the commands run are the ones --dry-run prints; a preempted slice is
  deleted and created again, and --restarts resumes after a preemption during training."""
  log = tmp_path / "calls.jsonl"
  recorder(tmp_path / "bin", "gcloud", log, FAKE_GCLOUD)
  state = tmp_path / "tpu_state"
  env = script_env(tmp_path, FAKE_TPU_STATE=str(state), TMPDIR=str(tmp_path))
  args = ["--workdir", "gs://b/run", "--config.train.steps=7"]
  printed = commands(run_script(TPU_VM, "--dry-run", *args, env=env).stdout)

  run_script(TPU_VM, *args, env=env)              # no slice yet: created
  ran = calls(log)
  assert [c[4] for c in ran] == ["describe", "create", "scp", "ssh", "ssh"]
  assert ran == [c for c in printed if c[0] == "gcloud"]
  shipped = (tmp_path / "tpu_state.shipped").read_text().splitlines()   # the checkout's HEAD, as scp got it
  assert "configs/yinggem.py" in shipped and "jaxlm/train.py" in shipped and "pyproject.toml" in shipped
  assert not list(tmp_path.glob("*.tar.gz"))                             # removed once copied

  log.unlink()
  run_script(TPU_VM, *args, "--skip-setup", env=env)   # READY: reused, nothing copied again
  assert [c[4] for c in calls(log)] == ["describe", "ssh"]

  log.unlink()
  state.write_text("PREEMPTED")
  (tmp_path / "tpu_state.preempt").write_text("")
  proc = run_script(TPU_VM, *args, "--restarts", "1", "--delete-after", env=env)
  assert [c[4] for c in calls(log)] == ["describe", "delete", "create", "scp", "ssh", "ssh",   # preempted in training
                                        "describe", "describe", "delete", "create", "scp", "ssh", "ssh",
                                        "delete"]
  assert "restart 1 of 1" in proc.stderr and not state.exists()

  log.unlink()
  (tmp_path / "tpu_state.preempt").write_text("")
  proc = run_script(TPU_VM, *args, env=env, check_rc=255)      # no --restarts: fails with gcloud's status
  assert [c[4] for c in calls(log)] == ["describe", "create", "scp", "ssh", "ssh"]


# ------------------------------------------------------------------------------------------ slurm_gpu.sbatch
def test_slurm_dry_run_defaults(tmp_path, fake_tools):
  venv = tmp_path / "venv"
  recorder(venv / "bin", "python", fake_tools)
  proc = run_script(SLURM, "--dry-run", env=script_env(tmp_path, JAXLM_VENV=str(venv)))
  assert calls(fake_tools) == [], "--dry-run ran a command"
  cmds = commands(proc.stdout)
  assert cmds[0] == ["cd", str(REPO)]
  assert ["python3", "-m", "venv", str(venv)] in cmds
  (install,) = [c for c in cmds if c[1:4] == ["-m", "pip", "install"] and "-e" in c]
  assert install[0] == f"{venv}/bin/python" and install[-1] == f"{REPO}[cuda]"
  srun = cmds[-1]
  assert srun[0] == "srun" and "--kill-on-bad-exit=1" in srun
  line = proc.stdout.splitlines()[-1]
  assert "bin/python -m jaxlm.train --config configs/yinggem.py:tiny --workdir runs/yinggem-tiny" in line
  # 2 nodes x 8 GPUs: the tiny recipe's batch sizes rounded up to multiples of 16.
  assert srun[-2:] == ["--config.train.batch_size=16", "--config.train.eval_batch_size=96"]
  assert cmds.index(install) < cmds.index(srun)
  assert not any(c[0] == "export" for c in cmds)    # one task per GPU: JAX maps task i to GPU SLURM_LOCALID


def test_slurm_sbatch_header():
  header = [line for line in SLURM.read_text().splitlines() if line.startswith("#SBATCH")]
  for want in ("--nodes=", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=TERM@", "--requeue"):
    assert any(want in line for line in header), want
  first_code = next(i for i, line in enumerate(SLURM.read_text().splitlines())
                    if line and not line.startswith("#"))
  assert first_code > max(i for i, line in enumerate(SLURM.read_text().splitlines()) if line.startswith("#SBATCH"))


def test_slurm_options_and_modes(tmp_path, fake_tools):
  env = script_env(tmp_path, JAXLM_VENV=str(tmp_path / "venv"))
  proc = run_script(SLURM, "--dry-run", "--config", "configs/hrom.py:tiny", "--workdir=/shared/r",
                    "--config.train.steps=5", "--no-install", env=env)
  cmds = commands(proc.stdout)
  assert not any("pip" in c or "venv" in c[:3] for c in cmds)
  assert cmds[-1][0] == "srun"
  assert cmds[-1][cmds[-1].index("-m"):] == ["-m", "jaxlm.train", "--config", "configs/hrom.py:tiny",
                                             "--workdir", "/shared/r", "--config.train.steps=5"]

  single = commands(run_script(SLURM, "--dry-run", "--single-node", "--no-install", env=env).stdout)
  assert single[-1][0] == f"{tmp_path}/venv/bin/python" and not any(c[0] == "srun" for c in single)

  # One task per node (sbatch --ntasks-per-node=1): that task gets every GPU of its node.
  in_job = dict(env, SLURM_JOB_ID="42", SLURM_NTASKS_PER_NODE="1", SLURM_GPUS_ON_NODE="4", SLURM_NNODES="3")
  cmds = commands(run_script(SLURM, "--dry-run", "--no-install", env=in_job).stdout)
  assert ["export", "JAX_LOCAL_DEVICE_IDS=0,1,2,3"] in cmds and cmds[-1][0] == "srun"
  assert cmds[-1][-2:] == ["--config.train.batch_size=12", "--config.train.eval_batch_size=96"]   # 3 x 4 GPUs
  # --single-node inside an allocation hides the job from JAX's SLURM detection.
  cmds = commands(run_script(SLURM, "--dry-run", "--single-node", "--no-install", env=in_job).stdout)
  assert cmds[-1][:3] == ["env", "-u", "SLURM_JOB_ID"]
  assert calls(fake_tools) == []


@pytest.mark.parametrize("args,message,slurm", [
    (["--dry-run", "--bogus"], "unknown option '--bogus'", {}),
    (["--dry-run", "--workdir"], "--workdir needs a value", {}),
    (["--dry-run", "x"], "unexpected argument 'x'", {}),
    (["--dry-run"], "2 tasks per node with 4 GPUs per node",
     dict(SLURM_JOB_ID="7", SLURM_NNODES="3", SLURM_NTASKS="6", SLURM_GPUS_ON_NODE="4")),
])
def test_slurm_usage_errors(tmp_path, fake_tools, args, message, slurm):
  proc = run_script(SLURM, *args, env=script_env(tmp_path, **slurm), check_rc=2)
  assert proc.stdout == "" and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
  assert calls(fake_tools) == []


def test_slurm_help():
  proc = subprocess.run(["bash", str(SLURM), "--help"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0 and proc.stdout.startswith("usage: sbatch")
  for word in ("--single-node", "--dry-run", "--ntasks-per-node=1", "JAX_COORDINATOR_PORT", "--workdir",
               "resumes"):
    assert word in proc.stdout, word


@pytest.mark.slow
def test_slurm_single_node_trains(tmp_path, fake_tools):
  """The single-node path outside SLURM really trains (with this interpreter as the environment)."""
  venv = tmp_path / "venv"
  (venv / "bin").mkdir(parents=True)
  (venv / "bin" / "python").symlink_to(sys.executable)
  workdir = tmp_path / "run"
  env = script_env(tmp_path, JAXLM_VENV=str(venv), JAX_PLATFORMS="cpu",
                   PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  proc = run_script(SLURM, "--no-install", "--workdir", str(workdir), "--config.train.steps=3",
                    "--config.train.eval_every=3", "--config.data.eval_batches=1", "--config.train.sample_tokens=0",
                    "--config.train.progress=False", env=env)
  assert "finished at step 3" in proc.stdout, proc.stderr[-3000:]
  assert "single node" in proc.stderr and calls(fake_tools) == []
  steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert max(steps) == 3


# ------------------------------------------------------------------------------------------ colab.ipynb
def load_notebook() -> dict:
  with open(NOTEBOOK, encoding="utf-8") as f:
    return json.load(f)


def cell_source(cell) -> str:
  src = cell["source"]
  return "".join(src) if isinstance(src, list) else src


def test_notebook_is_nbformat4():
  nb = load_notebook()
  assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 0
  assert nb["metadata"]["kernelspec"]["language"] == "python"
  kinds = [c["cell_type"] for c in nb["cells"]]
  assert set(kinds) == {"markdown", "code"} and kinds[0] == "markdown"
  ids = [c.get("id") for c in nb["cells"]]
  assert len(set(ids)) == len(ids)
  for cell in nb["cells"]:
    assert set(cell) >= {"cell_type", "metadata", "source"}
    if cell["cell_type"] == "code":
      assert cell["outputs"] == [] and cell["execution_count"] is None
      source = cell_source(cell)
      compile(source, "<cell>", "exec")       # plain Python: no ! or % magics
  codes = [cell_source(c) for c in nb["cells"] if c["cell_type"] == "code"]
  installs = [s for s in codes if s.startswith("# colab-install")]
  assert len(installs) == 1 and "pip" in installs[0] and "[tpu]" in installs[0] and "[cuda]" in installs[0]
  text = "\n".join(codes)
  for want in ('STEPS = int(os.environ.get("JAXLM_STEPS", "2000"))', "jax.default_backend()", "jax.devices()",
               '"jaxlm.train"', "metrics.jsonl", '"jaxlm.generate"', '"jax2torch"', '"torch2jax"', "ROUND TRIP OK"):
    assert want in text, want


@pytest.mark.slow
def test_notebook_runs_on_cpu(tmp_path):
  """Every code cell but the install, in order, in a fresh interpreter, with 20 training steps."""
  codes = [cell_source(c) for c in load_notebook()["cells"] if c["cell_type"] == "code"]
  script = tmp_path / "notebook.py"
  script.write_text("\n\n".join(s for s in codes if not s.startswith("# colab-install")))
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAXLM_")}
  env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", JAXLM_REPO=str(REPO), JAXLM_STEPS="20",
             JAXLM_EXTRA_FLAGS="--config.train.eval_every=10 --config.data.eval_batches=2 "
                               "--config.train.sample_tokens=0 --config.train.progress=False",
             PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
  proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
  rows = [json.loads(line) for line in (tmp_path / "runs" / "yinggem-tiny" / "metrics.jsonl").read_text().splitlines()]
  assert max(r["step"] for r in rows) == 20 and any("eval_loss" in r for r in rows)
  assert "backend: cpu" in proc.stdout
  assert (tmp_path / "export" / "yinggem.pth").stat().st_size > 0
  assert (tmp_path / "export" / "yinggem-tiny" / "config.json").is_file()
  assert "ROUND TRIP OK: parameters equal, logits equal, 100 greedy tokens equal" in proc.stdout
