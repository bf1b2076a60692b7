"""The local platform stack: a Ray head (dashboard, token auth) and an MLflow tracking server.

    python -m pneumoray.stack up     [--dir runs/stack] [--ray-port 6379] [--dashboard-port 8265] [--mlflow-port 5000]
    python -m pneumoray.stack status [--dir runs/stack]
    python -m pneumoray.stack down   [--dir runs/stack] [--timeout 20]

`up` starts what is not already running, waits until both answer and writes DIR/stack.env
(`source runs/stack/stack.env`, then `ray job submit --metadata-json '{"job_name": "train"}'
--working-dir . --runtime-env runtime_env.yaml -- python -m jobs.<stage> ...`). The Ray head's
dashboard listens on 127.0.0.1 only and token auth stays on; MLflow keeps runs and the registry in
DIR/mlflow.db, serves artifacts from DIR/mlartifacts, and runs MLflow's basic-auth app: one user,
made at the first `up` in DIR/mlflow-credentials (mlflow_auth.py). Jobs inherit MLFLOW_TRACKING_URI,
MLflow's MLFLOW_TRACKING_USERNAME / _PASSWORD and PNEUMORAY_RUNS (DIR/runs) from the head.

`down` stops exactly what `up` started and nothing else: never `ray stop`, which stops every Ray on
the machine. Each service runs in its own session; `down` signals that session's processes and
their descendants (Ray workers sit in process groups of their own, job drivers in sessions of their
own under the job's supervisor), SIGTERM first and SIGKILL after the timeout.
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from . import mlflow_auth
from .serving import SERVE_ENV

DEFAULT_DIR = "runs/stack"
HOST = "127.0.0.1"
# Ray's default worker port range: a service port inside it is refused by `ray start`.
RAY_WORKER_PORTS = range(10002, 20000)
STATE = "stack.json"
ENV_FILE = "stack.env"
MLFLOW_CREDENTIALS = "mlflow-credentials"


class StackError(RuntimeError):
    """A problem the user can fix (a port in use, a service that would not start)."""


# ---------------------------------------------------------------------------------------------
# Paths, token, ports


def token_path() -> Path:
    """The Ray auth token file: RAY_AUTH_TOKEN_PATH if set, else Ray's default ~/.ray/auth_token."""
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token").expanduser()


def ensure_token(python: str) -> Path:
    """Make sure the token file exists (Ray's own `ray get-auth-token --generate` writes it)."""
    path = token_path()
    if not path.is_file() or not path.read_text().strip():
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        env.pop("RAY_AUTH_TOKEN", None)
        proc = subprocess.run([python, "-m", "ray.scripts.scripts", "get-auth-token", "--generate"],
                              env=env, capture_output=True, text=True)  # stdout is the token: never shown
        if proc.returncode != 0 or not path.is_file():
            raise StackError(f"could not create the Ray auth token {path}: {proc.stderr.strip()[-500:]}")
        path.chmod(0o600)
    return path


def ray_temp_dir(root: Path) -> Path:
    """Ray's --temp-dir for this stack. Ray puts Unix sockets under it, and a socket path may not
    exceed 107 bytes, so a deep DIR gets a short folder in the system temp dir instead (one per DIR)."""
    inside = root / "ray"
    if len(str(inside)) <= 40:
        return inside
    digest = hashlib.sha1(str(root).encode()).hexdigest()[:10]
    return Path("/tmp") / f"pneumoray-ray-{digest}"


def free_port() -> int:
    """A port nobody listens on now (the kernel's ephemeral range, outside Ray's worker ports)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))  # all interfaces: catches listeners on 127.0.0.1, 0.0.0.0 and [::]
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                return True
            raise
    return False


def _listener(port: int) -> str:
    try:
        import psutil

        for conn in psutil.net_connections("tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
                return f" by pid {conn.pid} ({psutil.Process(conn.pid).name()})"
    except Exception:  # noqa: BLE001 - naming the owner is a courtesy; no permission, no name
        pass
    return ""


def _next_free(port: int, taken) -> int:
    for candidate in range(port + 1, port + 200):
        if candidate not in taken and candidate not in RAY_WORKER_PORTS and not port_in_use(candidate):
            return candidate
    return free_port()


def check_ports(ports: dict[str, tuple[int, str]]) -> None:
    """ports: name -> (port, the option that changes it). Raises StackError naming the port and the fix."""
    problems = []
    seen: dict[int, str] = {}
    for name, (port, option) in ports.items():
        if port in seen:
            problems.append(f"{name} and {seen[port]} both asked for port {port}: give {option} another port")
        seen[port] = name
        if name.startswith("Ray") and port in RAY_WORKER_PORTS:
            problems.append(f"port {port} ({name}) is inside Ray's worker port range "
                            f"{RAY_WORKER_PORTS.start}-{RAY_WORKER_PORTS.stop - 1}: pick another with {option}")
        elif port_in_use(port):
            problems.append(f"port {port} ({name}) is already in use{_listener(port)}: stop that process "
                            f"or pick a free port, e.g. {option} {_next_free(port, seen)}")
    if problems:
        raise StackError("cannot start the stack:\n  " + "\n  ".join(problems))


# ---------------------------------------------------------------------------------------------
# Processes


def _process(info: dict | None):
    """The live psutil.Process an entry of stack.json names, or None (gone, or the pid was reused)."""
    import psutil

    if not info:
        return None
    try:
        proc = psutil.Process(info["pid"])
        if abs(proc.create_time() - info["create_time"]) > 0.5 or proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return proc
    except psutil.Error:
        return None


def members(info: dict) -> list:
    """Every live process of one service: its session (Ray workers change their process group but
    keep the session) and all descendants (job drivers start sessions of their own)."""
    import psutil

    leader = _process(info)
    sid = info["pid"]  # started with start_new_session: session id == leader pid
    found = {}
    for proc in psutil.process_iter(["pid"]):
        try:
            if os.getsid(proc.pid) == sid and proc.create_time() >= info["create_time"] - 0.5:
                found[proc.pid] = proc
        except (OSError, psutil.Error):
            continue
    for proc in [leader, *found.values()]:
        if proc is None:
            continue
        try:
            for child in proc.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            continue
    return [p for p in found.values() if _alive(p)]


def _alive(proc) -> bool:
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _signal(procs, sig) -> None:
    import psutil

    for proc in procs:
        try:
            proc.send_signal(sig)  # psutil checks the pid still names the same process
        except psutil.Error:
            pass


def ray_phase(proc, leader_pid: int) -> int:
    """The order `ray stop` uses: raylets first (they stop their workers), then the other Ray
    processes, the GCS last; the `ray start --block` leader with the GCS. A process stopped after
    the GCS hangs on its way out (the autoscaler monitor reports its own end to the GCS)."""
    try:
        name = proc.name()
    except Exception:  # noqa: BLE001 - gone meanwhile
        return 1
    if name == "raylet":
        return 0
    if name == "gcs_server" or proc.pid == leader_pid:
        return 2
    return 1


def stop_service(info: dict, timeout: float = 20.0, phase=None) -> dict:
    """Stop every process of one service: SIGTERM phase by phase (`phase(proc, leader_pid)` -> 0, 1, 2;
    all in one by default), each phase waiting up to its share of `timeout`, then SIGKILL what is left.
    Processes forked meanwhile (a worker starting up) are found on every poll and get the same."""
    start = time.monotonic()
    known = {p.pid: p for p in members(info)}
    if not known:
        return {"stopped": 0, "killed": [], "seconds": 0.0}
    phase = phase or (lambda proc, leader_pid: 0)
    phases = sorted({phase(p, info["pid"]) for p in known.values()} | {0})
    share = timeout / len(phases)
    for i, current in enumerate(phases):
        deadline = start + share * (i + 1)
        signalled = set()
        while True:
            for proc in members(info):
                known.setdefault(proc.pid, proc)
            due = [p for p in known.values() if phase(p, info["pid"]) <= current and _alive(p)]
            _signal([p for p in due if p.pid not in signalled], signal.SIGTERM)
            signalled.update(p.pid for p in due)
            if not due or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    killed: list[str] = []
    for _ in range(3):
        left = [p for p in known.values() if _alive(p)] + [p for p in members(info) if p.pid not in known]
        if not left:
            break
        for p in left:
            known[p.pid] = p
            killed.append(_name(p))
        _signal(left, signal.SIGKILL)
        time.sleep(1.0)
    return {"stopped": len(known), "killed": killed, "seconds": round(time.monotonic() - start, 1)}


def _name(proc) -> str:
    try:
        return f"{proc.pid} {' '.join(proc.cmdline())[-90:] or proc.name()}"
    except Exception:  # noqa: BLE001
        return str(proc.pid)


def _spawn(cmd: list[str], env: dict, log: Path, cwd: Path) -> dict:
    import psutil

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    return {"pid": proc.pid, "create_time": psutil.Process(proc.pid).create_time(), "log": str(log),
            "cmd": cmd}


def _tail(path: str, lines: int = 25) -> str:
    try:
        text = Path(path).read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("    " + line for line in text[-lines:])


# ---------------------------------------------------------------------------------------------
# Health


def _get(url: str, token: str | None = None, timeout: float = 3.0) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError):
        return 0


def ray_ready(state: dict) -> bool:
    """The job API answers with our token (the job module of the dashboard is up, GCS with it)."""
    token = Path(state["token_path"]).read_text().strip() if Path(state["token_path"]).is_file() else None
    return _get(f"{state['urls']['dashboard']}/api/jobs/", token) == 200


def mlflow_ready(state: dict) -> bool:
    return _get(f"{state['urls']['mlflow']}/health") == 200


# ---------------------------------------------------------------------------------------------
# State and environment


def load_state(root: Path) -> dict | None:
    path = Path(root) / STATE
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def _save_state(root: Path, state: dict) -> None:
    tmp = root / (STATE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(root / STATE)


def user_env(state: dict) -> dict[str, str]:
    """What a shell needs to use the stack: `ray job submit` and MLflow clients."""
    return {
        # RAY_API_SERVER_ADDRESS, not RAY_ADDRESS: the job CLI reads either, but an http:// RAY_ADDRESS
        # makes every ray.init() in that shell fail ("Invalid Ray address"), stages run directly included.
        "RAY_API_SERVER_ADDRESS": state["urls"]["dashboard"],
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "MLFLOW_TRACKING_URI": state["urls"]["mlflow"],
        **mlflow_auth.client_env(credentials_path(state)),  # MLflow's basic auth (mlflow_auth.py)
    }


def credentials_path(state: dict) -> Path:
    """The stack's MLflow user (mlflow_auth's format), made at the first `up`."""
    return Path(state["dir"]) / MLFLOW_CREDENTIALS


def head_env(state: dict, python: str) -> dict[str, str]:
    """The Ray head's environment, which every driver and worker of a job inherits."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH_TOKEN", "MLFLOW_TRACKING_URI",
                        "MLFLOW_REGISTRY_URI", "MLFLOW_TRACKING_TOKEN", "PNEUMORAY_RUNS")}
    env.update({
        "RAY_AUTH_MODE": "token",  # explicit: a RAY_AUTH_MODE=disabled in the caller's shell never leaks in
        "RAY_AUTH_TOKEN_PATH": state["token_path"],
        "RAY_USAGE_STATS_ENABLED": "0",
        # On SIGTERM `ray start --block` would first drain the node for up to 30 s (for Serve rolling
        # upgrades); `down` stops everything at once anyway.
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
        "MLFLOW_TRACKING_URI": state["urls"]["mlflow"],
        **mlflow_auth.client_env(credentials_path(state)),  # every job and replica logs in as the stack's user
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "PNEUMORAY_RUNS": str(Path(state["dir"]) / "runs"),
        # `python` in a job's entrypoint is the interpreter that runs Ray.
        "PATH": str(Path(python).parent) + os.pathsep + os.environ.get("PATH", ""),
        # Serve's proxy and replicas read these at their start: the header cap, the throughput-optimised
        # mode (as `python -m serve` and cluster.yaml set them); a value in the caller's shell wins.
        **{key: os.environ.get(key, value) for key, value in SERVE_ENV.items()},
    })
    return env


def write_env_file(state: dict) -> Path:
    path = Path(state["dir"]) / ENV_FILE
    lines = [f"# The local pneumoray stack in {state['dir']} (python -m pneumoray.stack up).",
             f"# Use: source {path}",
             f"# Ray dashboard {state['urls']['dashboard']}   MLflow UI {state['urls']['mlflow']}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in user_env(state).items()]
    path.unlink(missing_ok=True)
    mlflow_auth._write_private(path, "\n".join(lines) + "\n")  # it holds the MLflow password: 0600
    return path


# ---------------------------------------------------------------------------------------------
# up / down / status


def status(root: str | Path = DEFAULT_DIR) -> dict:
    root = Path(root).resolve()
    state = load_state(root)
    if state is None:
        return {"dir": str(root), "running": False, "ray": None, "mlflow": None}
    ray_proc, mlflow_proc = _process(state.get("ray")), _process(state.get("mlflow"))
    report = {
        "dir": str(root),
        "ray": {"pid": state["ray"]["pid"], "alive": ray_proc is not None,
                "answering": ray_proc is not None and ray_ready(state), **state["ports"]["ray"],
                "temp_dir": state["ray"]["temp_dir"]} if state.get("ray") else None,
        "mlflow": {"pid": state["mlflow"]["pid"], "alive": mlflow_proc is not None,
                   "answering": mlflow_proc is not None and mlflow_ready(state),
                   "port": state["ports"]["mlflow"]} if state.get("mlflow") else None,
        "urls": state["urls"], "env_file": str(root / ENV_FILE),
    }
    report["running"] = bool(report["ray"] and report["ray"]["answering"]
                             and report["mlflow"] and report["mlflow"]["answering"])
    return report


def up(root: str | Path = DEFAULT_DIR, ray_port: int = 6379, dashboard_port: int = 8265,
       mlflow_port: int = 5000, num_cpus: int | None = None, python: str | None = None,
       timeout: float = 300.0, log=print) -> dict:
    """Start the stack (or what of it is not running) and wait until both services answer.
    Returns the state (also in DIR/stack.json); DIR/stack.env holds the user's environment."""
    python = python or sys.executable
    root = Path(root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    state = load_state(root)
    ray_alive = state is not None and _process(state.get("ray")) is not None
    mlflow_alive = state is not None and _process(state.get("mlflow")) is not None
    asked = {"gcs": ray_port, "dashboard": dashboard_port, "mlflow": mlflow_port}
    if ray_alive or mlflow_alive:  # a running part keeps its ports (the head's jobs know MLflow's)
        have = {**state["ports"]["ray"], "mlflow": state["ports"]["mlflow"]}
        if any(have[k] != v for k, v in asked.items()):
            log(f"note: the stack in {root} runs on ports gcs {have['gcs']}, dashboard {have['dashboard']}, "
                f"mlflow {have['mlflow']}; `down` first to change them")
        ray_port, dashboard_port, mlflow_port = have["gcs"], have["dashboard"], have["mlflow"]
    if ray_alive and mlflow_alive:
        _wait(state, timeout, log)
        log(f"the stack in {root} is already running")
        write_env_file(state)
        return state

    wanted = {}
    if not ray_alive:
        wanted["Ray GCS"] = (ray_port, "--ray-port")
        wanted["Ray dashboard"] = (dashboard_port, "--dashboard-port")
    if not mlflow_alive:
        wanted["MLflow"] = (mlflow_port, "--mlflow-port")
    check_ports(wanted)

    new = {
        "dir": str(root),
        "token_path": str(ensure_token(python)),
        "ports": {"ray": state["ports"]["ray"] if ray_alive else {"gcs": ray_port, "dashboard": dashboard_port},
                  "mlflow": mlflow_port},
        "urls": {"dashboard": f"http://{HOST}:{dashboard_port}", "mlflow": f"http://{HOST}:{mlflow_port}"},
        "ray": state["ray"] if ray_alive else None,
        "mlflow": state["mlflow"] if mlflow_alive else None,
    }
    (root / "runs").mkdir(exist_ok=True)
    started = time.monotonic()

    if not mlflow_alive:
        (root / "mlartifacts").mkdir(exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI",)}
        env.update({"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                    **mlflow_auth.server_env(root / "mlflow-auth", credentials_path(new))})
        new["mlflow"] = _spawn(
            [sys.executable, "-m", "mlflow", "server", "--app-name", mlflow_auth.APP_NAME,
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--serve-artifacts", "--artifacts-destination", str(root / "mlartifacts"),
             "--host", HOST, "--port", str(new["ports"]["mlflow"]), "--workers", "1"],
            env, root / "logs" / "mlflow.log", cwd=root)
        log(f"MLflow server starting (pid {new['mlflow']['pid']}, log {new['mlflow']['log']})")

    if not ray_alive:
        temp_dir = ray_temp_dir(root)
        temp_dir.mkdir(parents=True, exist_ok=True)
        internal = {"client_server": free_port(), "dashboard_agent": free_port()}
        new["ports"]["ray"].update(internal)
        cmd = [python, "-m", "ray.scripts.scripts", "start", "--head", "--block",
               "--port", str(ray_port), "--dashboard-host", HOST, "--dashboard-port", str(dashboard_port),
               "--ray-client-server-port", str(internal["client_server"]),
               "--dashboard-agent-listen-port", str(internal["dashboard_agent"]),
               "--temp-dir", str(temp_dir), "--disable-usage-stats"]
        if num_cpus is not None:
            cmd += ["--num-cpus", str(num_cpus)]
        new["ray"] = _spawn(cmd, head_env(new, python), root / "logs" / "ray.log", cwd=root)
        new["ray"]["temp_dir"] = str(temp_dir)
        log(f"Ray head starting (pid {new['ray']['pid']}, log {new['ray']['log']})")

    _save_state(root, new)
    try:
        _wait(new, timeout, log)
    except (StackError, KeyboardInterrupt):
        log("stopping what was started")
        for name in ("ray", "mlflow"):
            if new.get(name) and not (name == "ray" and ray_alive) and not (name == "mlflow" and mlflow_alive):
                stop_service(new[name], 10, ray_phase if name == "ray" else None)
        raise
    new["up_seconds"] = round(time.monotonic() - started, 1)
    _save_state(root, new)
    write_env_file(new)
    return new


def _wait(state: dict, timeout: float, log) -> None:
    deadline = time.monotonic() + timeout
    pending = {"ray": ray_ready, "mlflow": mlflow_ready}
    while pending:
        for name, ready in list(pending.items()):
            if _process(state[name]) is None:
                raise StackError(f"the {name} service exited while starting; the end of {state[name]['log']}:\n"
                                 + _tail(state[name]["log"]))
            if ready(state):
                pending.pop(name)
        if pending and time.monotonic() > deadline:
            names = ", ".join(pending)
            raise StackError(f"{names} did not answer within {timeout:.0f} s; see "
                             + ", ".join(state[n]["log"] for n in pending))
        if pending:
            time.sleep(0.5)


def down(root: str | Path = DEFAULT_DIR, timeout: float = 20.0, log=print) -> dict:
    """Stop the services `up` started in DIR (and only those). Returns what was stopped."""
    root = Path(root).resolve()
    state = load_state(root)
    if state is None:
        log(f"no stack in {root}")
        return {}
    names = [n for n in ("ray", "mlflow") if state.get(n)]
    with ThreadPoolExecutor(len(names) or 1) as pool:  # both at once: Ray's shutdown is the slow one
        report = dict(zip(names, pool.map(lambda n: stop_service(state[n], timeout, ray_phase if n == "ray" else None), names)))
    for name in names:
        r = report[name]
        log(f"{name}: stopped {r['stopped']} processes in {r['seconds']} s"
            + (f"; SIGKILL after {timeout:.0f} s: {', '.join(r['killed'])}" if r["killed"] else ""))
    (root / STATE).unlink(missing_ok=True)
    (root / ENV_FILE).unlink(missing_ok=True)
    return report


def _print_env(state: dict) -> None:
    env_file = Path(state["dir"]) / ENV_FILE
    print(f"Ray dashboard: {state['urls']['dashboard']}  (token auth on; the token is in {state['token_path']})")
    print(f"MLflow UI:     {state['urls']['mlflow']}  (log in as the user and password in {credentials_path(state)})")
    print(f"environment:   {env_file}")
    print("\n".join(line if "MLFLOW_TRACKING_PASSWORD" not in line
                    else f"export MLFLOW_TRACKING_PASSWORD=...  # in {credentials_path(state)}"
                    for line in env_file.read_text().rstrip().splitlines()))
    shown = env_file.relative_to(Path.cwd()) if env_file.is_relative_to(Path.cwd()) else env_file
    print("\nThen, from the repository root:")
    print(f"  source {shown}")
    print("  ray job submit --metadata-json '{\"job_name\": \"train\"}' --working-dir . --runtime-env runtime_env.yaml "
          "-- python -m jobs.train "
          "--profile tiny --data $PWD/runs/demo/manifest.parquet")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pneumoray.stack", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", default=DEFAULT_DIR, help="the stack's folder (default: %(default)s)")
    parser.add_argument("--ray-port", type=int, default=6379, help="Ray GCS port (default: %(default)s)")
    parser.add_argument("--dashboard-port", type=int, default=8265, help="Ray dashboard and job API (default: %(default)s)")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="MLflow server (default: %(default)s)")
    parser.add_argument("--num-cpus", type=int, help="CPUs the Ray head offers (default: all)")
    parser.add_argument("--timeout", type=float, help="seconds to wait: for `up` to answer (300), "
                                                      "for `down` before SIGKILL (20)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            t0 = time.monotonic()
            state = up(args.dir, args.ray_port, args.dashboard_port, args.mlflow_port, args.num_cpus,
                       timeout=args.timeout or 300.0)
            print(f"stack up in {time.monotonic() - t0:.1f} s")
            _print_env(state)
        elif args.command == "down":
            down(args.dir, timeout=args.timeout or 20.0)
        else:
            report = status(args.dir)
            print(json.dumps(report, indent=2))
            return 0 if report["running"] else 3
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
