"""The platform outside one process: cluster.yaml against the schema Ray ships; the local stack (a real
`ray start --head` and a real MLflow server, started and stopped by pneumoray.stack on free ports);
`ray job submit` of the phantom preparation and a tiny training job, whose run and registered model
land in the stack's MLflow server; `down` stopping exactly that stack."""

import base64
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import REPO

from pneumoray import mlflow_auth, stack
from pneumoray.phantoms import generate_phantoms

CLUSTER = REPO / "cluster.yaml"
RUNTIME_ENV = REPO / "runtime_env.yaml"
# GPU memory of the instance types a 24 GB (RTX 3090 class) worker may use.
GPU_GB = {**{f"g5.{s}": 24 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")},   # A10G
          **{f"g6.{s}": 24 for s in ("xlarge", "2xlarge", "4xlarge", "8xlarge", "16xlarge")}}   # L4


def pyproject(pattern: str) -> str:
    """One value of pyproject.toml (a regex with one group; no TOML parser on Python 3.10)."""
    return re.search(pattern, (REPO / "pyproject.toml").read_text()).group(1)


def cluster() -> dict:
    return yaml.safe_load(CLUSTER.read_text())


def commands(cfg: dict, *keys: str) -> str:
    return "\n".join(line for key in keys for line in cfg.get(key) or [])


# ---------------------------------------------------------------------------------------------
# cluster.yaml and runtime_env.yaml (fast)


def test_cluster_yaml_is_valid_for_rays_schema():
    import jsonschema
    import ray

    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    jsonschema.validate(cluster(), schema)


def test_cluster_yaml_says_what_we_mean():
    cfg = cluster()
    setup = commands(cfg, "setup_commands", "head_setup_commands", "worker_setup_commands")
    head, worker = commands(cfg, "head_start_ray_commands"), commands(cfg, "worker_start_ray_commands")

    # Token auth on every node, with one token shipped to all of them; never disabled.
    for start in (head, worker):
        assert "RAY_AUTH_MODE=token" in start
    assert "RAY_AUTH_MODE=disabled" not in json.dumps(cfg)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    # MLflow's basic auth on the head's server, its user shipped like the token and exported on every node.
    assert cfg["file_mounts"]["~/.mlflow/credentials"] == "~/.mlflow/credentials"
    assert "mlflow server --app-name basic-auth" in head and "pneumoray.mlflow_auth server-env" in head
    for start in (head, worker):
        assert 'eval "$(~/venv/bin/python -m pneumoray.mlflow_auth client-env)"' in start
    # The dashboard on the head's loopback only; nothing but SSH let in from outside.
    assert "--dashboard-host=127.0.0.1" in head and "--dashboard-host=0.0.0.0" not in head
    assert cfg["provider"]["security_group"]["IpPermissions"] == []
    # A CPU head and an autoscaled worker type with 24 GB GPUs.
    nodes = cfg["available_node_types"]
    assert nodes[cfg["head_node_type"]]["node_config"]["InstanceType"] not in GPU_GB
    gpu = [n for n in nodes.values() if GPU_GB.get(n["node_config"]["InstanceType"]) == 24]
    assert gpu, "no worker type with a 24 GB GPU"
    assert gpu[0]["min_workers"] == 0 < gpu[0]["max_workers"] <= cfg["max_workers"]
    # Versions: ray pinned as pyproject pins it; a Python pyproject accepts; torch 2.13.0 before the project.
    ray_pin = pyproject(r'"(ray\[[^"]*\]==[\d.]+)"')
    version = ray_pin.split("==")[1]
    pins = re.findall(r"ray\[[^\]]*\]==([\d.]+)", setup)
    assert pins and set(pins) == {version}, (pins, ray_pin)
    from packaging.specifiers import SpecifierSet

    python = set(re.findall(r"--python (3\.\d+)", setup))
    assert python == {"3.11"} and "3.11" in SpecifierSet(pyproject(r'requires-python\s*=\s*"([^"]+)"'))
    lines = cfg["setup_commands"]
    torch_at = next(i for i, c in enumerate(lines) if '"torch==2.13.0"' in c)
    project_at = next(i for i, c in enumerate(lines) if "~/pneumoray" in c and "install" in c)
    assert torch_at < project_at
    assert "torchvision" not in json.dumps(cfg)
    # Serve's settings (the header cap in the proxy, the throughput-optimised mode) on every node, as
    # `python -m serve` sets them: proxies and replicas read them at their start.
    from pneumoray.serving import SERVE_ENV

    for start in (head, worker):
        for key, value in SERVE_ENV.items():
            assert f"{key}={value}" in start, key
    # Jobs find the MLflow server on the head; rsync leaves .gitignore'd folders (runs/, .venv/) home.
    assert "MLFLOW_TRACKING_URI=http://$RAY_HEAD_IP:5000" in worker and "MLFLOW_TRACKING_URI=" in head
    assert ".gitignore" in cfg["rsync_filter"]


def test_mlflow_credentials_are_made_once_private_and_exported(tmp_path):
    creds = tmp_path / "home" / "credentials"
    out = subprocess.run([sys.executable, "-m", "pneumoray.mlflow_auth", "client-env", "--credentials", str(creds)],
                         capture_output=True, text=True, check=True).stdout
    assert creds.stat().st_mode & 0o777 == 0o600
    user, password = mlflow_auth.ensure_credentials(creds)
    assert out.splitlines() == [f"export MLFLOW_TRACKING_USERNAME={user}", f"export MLFLOW_TRACKING_PASSWORD={password}"]
    assert len(password) >= 24 and mlflow_auth.ensure_credentials(creds) == (user, password)  # made once
    env = mlflow_auth.server_env(tmp_path / "server", creds)
    config = Path(env["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    assert f"admin_username = {user}" in config and "default_permission = READ" in config
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == password and len(env["MLFLOW_FLASK_SERVER_SECRET_KEY"]) == 64
    assert mlflow_auth.server_env(tmp_path / "server", creds) == env  # the same key across restarts
    creds.chmod(0o644)
    proc = subprocess.run([sys.executable, "-m", "pneumoray.mlflow_auth", "client-env", "--credentials", str(creds)],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and f"chmod 600 {creds}" in proc.stderr


def test_the_stacks_ray_head_gets_serves_settings(tmp_path, monkeypatch):
    from pneumoray.serving import SERVE_ENV

    for key in SERVE_ENV:
        monkeypatch.delenv(key, raising=False)
    state = {"dir": str(tmp_path), "token_path": str(tmp_path / "token"), "urls": {"mlflow": "http://127.0.0.1:1"}}
    env = stack.head_env(state, sys.executable)
    assert {key: env[key] for key in SERVE_ENV} == SERVE_ENV  # an endpoint on the stack gets the header cap
    monkeypatch.setenv("RAY_SERVE_THROUGHPUT_OPTIMIZED", "0")  # the user's own choice wins
    assert stack.head_env(state, sys.executable)["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "0"


def test_runtime_env_ships_the_library():
    env = yaml.safe_load(RUNTIME_ENV.read_text())
    assert env["py_modules"] == ["platform/pneumoray"]
    assert (REPO / "platform" / "pneumoray" / "__init__.py").is_file()
    assert {"/runs", "/.venv", "/platform", "/stack.py"} <= set(env["excludes"])
    # The cluster's own environment says where MLflow is; a file pinned to one server would be wrong elsewhere.
    assert not {"MLFLOW_TRACKING_URI", "PNEUMORAY_RUNS", "RAY_AUTH_MODE"} & set(env.get("env_vars", {}))


def test_a_port_in_use_is_refused_naming_port_and_fix(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(stack.StackError) as err:
            stack.up(tmp_path / "s", ray_port=stack.free_port(), dashboard_port=stack.free_port(),
                     mlflow_port=port, log=lambda *_: None)
    assert f"port {port} (MLflow) is already in use" in str(err.value) and "--mlflow-port" in str(err.value)
    assert not (tmp_path / "s" / "stack.json").exists()  # nothing was started
    with pytest.raises(stack.StackError, match="inside Ray's worker port range"):
        stack.up(tmp_path / "s", ray_port=12000, log=lambda *_: None)


# ---------------------------------------------------------------------------------------------
# A real stack


@pytest.fixture(scope="module")
def bare_python(tmp_path_factory):
    """An interpreter with this environment's packages but without the editable pneumoray install,
    as on a cluster node that never installed the project: a venv whose .pth adds our site-packages
    folder (a folder added that way has its own .pth files, the editable install's among them, ignored)."""
    root = tmp_path_factory.mktemp("bare") / "venv"
    subprocess.run([sys._base_executable, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    ours = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    Path(purelib, "pneumoray_test_site.pth").write_text("\n".join(sorted(ours)) + "\n")
    probe = subprocess.run([python, "-c", "import ray\ntry:\n import pneumoray\nexcept ImportError:\n"
                                          " print('absent')\nelse:\n print(pneumoray.__file__)"],
                           cwd="/", capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr[-2000:]
    if probe.stdout.strip() != "absent":  # not a venv here: the base interpreter sees the install itself
        pytest.skip(f"cannot hide the installed pneumoray ({probe.stdout.strip()})")
    return str(python)


@pytest.fixture(scope="module")
def address_file():
    """Ray's "latest cluster" file, which a plain ray.init() on this machine follows."""
    path = Path("/tmp/ray/ray_current_cluster")
    return path, (path.read_text() if path.exists() else None)


@pytest.fixture(scope="module")
def running(tmp_path_factory, bare_python, address_file):
    root = tmp_path_factory.mktemp("stack")
    ports = {"ray_port": stack.free_port(), "dashboard_port": stack.free_port(), "mlflow_port": stack.free_port()}
    t0 = time.monotonic()
    state = stack.up(root, num_cpus=2, python=bare_python, **ports)
    print(f"\nstack up: {time.monotonic() - t0:.1f} s")
    yield state
    stack.down(root)  # a no-op once test_down_stops_exactly_the_stack has run
    if state["ray"]["temp_dir"].startswith("/tmp/pneumoray-ray-"):
        shutil.rmtree(state["ray"]["temp_dir"], ignore_errors=True)


def job_env(state: dict) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "PNEUMORAY_RUNS")}
    return {**env, **stack.user_env(state)}


def ray_cli(*args: str) -> list[str]:
    ray = Path(sys.executable).parent / "ray"
    return [str(ray), *args] if ray.exists() else [sys.executable, "-m", "ray.scripts.scripts", *args]


def test_up_again_reports_the_running_stack(running, address_file):
    again = stack.up(running["dir"], log=lambda *_: None)
    assert (again["ray"]["pid"], again["mlflow"]["pid"]) == (running["ray"]["pid"], running["mlflow"]["pid"])
    report = stack.status(running["dir"])
    assert report["running"] and report["ray"]["answering"] and report["mlflow"]["answering"]
    env_file = (Path(running["dir"]) / "stack.env").read_text()
    for key, value in stack.user_env(running).items():
        assert f"export {key}={shlex.quote(value)}" in env_file
    assert "RAY_AUTH_MODE=token" in env_file
    assert (Path(running["dir"]) / "stack.env").stat().st_mode & 0o777 == 0o600  # it holds the MLflow password
    # MLflow's basic auth is on: the API refuses a request without the stack's user, answers with it.
    api = f"{running['urls']['mlflow']}/api/2.0/mlflow/experiments/search?max_results=1"
    assert stack._get(api) == 401
    creds = stack.credentials_path(running)
    assert creds.stat().st_mode & 0o777 == 0o600
    user, password = mlflow_auth.ensure_credentials(creds)
    request = urllib.request.Request(api, headers={"Authorization": "Basic " + base64.b64encode(
        f"{user}:{password}".encode()).decode()})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.status == 200
    assert stack._get(f"{running['urls']['mlflow']}/health") == 200  # health needs no login
    # Token auth is on: the job API refuses a request without the token.
    assert stack._get(f"{running['urls']['dashboard']}/api/jobs/") == 401
    # The stack's head keeps its address in its own temp dir: a plain ray.init() elsewhere does not follow it.
    path, before = address_file
    assert (path.read_text() if path.exists() else None) == before


def test_job_submit_trains_into_the_stacks_mlflow(running, tmp_path_factory, monkeypatch):
    from mlflow import MlflowClient

    data = tmp_path_factory.mktemp("data")
    generate_phantoms(data / "phantoms", patients=24, seed=11, size=96)
    manifest, summary_file = data / "manifest.parquet", data / "train.json"
    steps = [
        ["python", "-c", "import pathlib, pneumoray; print('PNEUMORAY_FROM', pneumoray.__file__); "
                         "print('STACK_SHIPPED', (pathlib.Path(pneumoray.__file__).parent / 'stack.py').exists())"],
        ["python", "-m", "jobs.prepare", "--data", str(data / "phantoms"), "--out", str(manifest)],
        ["python", "-m", "jobs.train", "--profile", "tiny", "--data", str(manifest), "--set", "train.epochs=1",
         "--run-name", "stack-test", "--out", str(summary_file)],
    ]
    submission = f"stack-test-{os.getpid()}"
    t0 = time.monotonic()
    proc = subprocess.run(
        ray_cli("job", "submit", "--working-dir", ".", "--runtime-env", "runtime_env.yaml",
                "--submission-id", submission, "--metadata-json", json.dumps({"job_name": "stack-test"}),
                "--", "bash", "-c", " && ".join(shlex.join(s) for s in steps)),
        cwd=REPO, env=job_env(running), capture_output=True, text=True, timeout=900)
    print(f"\njob submit wall: {time.monotonic() - t0:.1f} s")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    status = subprocess.run(ray_cli("job", "status", submission), cwd=REPO, env=job_env(running),
                            capture_output=True, text=True, timeout=120)
    assert f"Job '{submission}' succeeded" in status.stdout, status.stdout + status.stderr  # status SUCCEEDED

    # The driver imported the copy the runtime_env shipped (the Ray head's Python has no pneumoray at all,
    # so the Ray Train workers that trained must have used it too).
    where = re.search(r"PNEUMORAY_FROM (\S+)", proc.stdout)
    assert where, proc.stdout[-3000:]
    assert "/runtime_resources/py_modules_files/" in where.group(1)
    assert not where.group(1).startswith(str(REPO))
    assert "STACK_SHIPPED False" in proc.stdout  # the supervisor stays home (runtime_env.yaml excludes)

    # The run and the registered model are in the stack's MLflow server, the artifacts in its store.
    summary = json.loads(summary_file.read_text())
    # registry_uri too: without it the client uses the process-wide registry URI, which an earlier test's
    # mlflow.set_registry_uri may have pointed at its own store.
    # MLflow's standard variables carry the stack's user, as stack.env sets them for a shell.
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(key, stack.user_env(running)[key])
    client = MlflowClient(tracking_uri=running["urls"]["mlflow"], registry_uri=running["urls"]["mlflow"])
    run = client.get_run(summary["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "stack-test"
    assert client.get_experiment(run.info.experiment_id).name == "pneumoray"
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/confusion_val.png"}
    assert any((Path(running["dir"]) / "mlartifacts").rglob("confusion_val.png"))
    version = client.get_model_version("pneumonia-clip", summary["version"])
    assert version.run_id == summary["run_id"]
    assert client.get_model_version_by_alias("pneumonia-clip", "champion").version == summary["version"]
    # The job's run folder is the stack's (PNEUMORAY_RUNS from the head), and no local SQLite store appeared.
    runs = Path(running["dir"]) / "runs"
    assert (runs / "ray_results").is_dir() and not list(runs.rglob("mlflow.db"))


def test_down_stops_exactly_the_stack(running, ray_local):
    own = ray_local._private.worker._global_node.all_processes  # the test session's Ray
    own_pids = [info.process.pid for infos in own.values() for info in infos]
    procs = stack.members(running["ray"]) + stack.members(running["mlflow"])
    assert len(procs) > 5

    t0 = time.monotonic()
    report = stack.down(running["dir"])
    print(f"\nstack down: {time.monotonic() - t0:.1f} s, {report}")
    assert not [p for p in procs if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert not stack.members(running["ray"]) and not stack.members(running["mlflow"])
    for port in (running["ports"]["ray"]["gcs"], running["ports"]["ray"]["dashboard"], running["ports"]["mlflow"]):
        assert not stack.port_in_use(port), port
    assert not stack.status(running["dir"])["running"]
    assert not (Path(running["dir"]) / "stack.env").exists()

    # The session's own Ray was left alone.
    assert all(psutil.pid_exists(pid) for pid in own_pids)
    assert ray_local.get(ray_local.remote(lambda: 42).remote()) == 42
