"""Serve the registered classifier over HTTP, in the foreground, until Ctrl-C (or SIGTERM).

    python -m serve --port 8000 [--host 127.0.0.1] [--model models:/pneumonia-clip@champion]
                    [--profile tiny] [--set serve.poll_s=2] [--address auto] [--no-dashboard]

The model comes from the MLflow registry (MLFLOW_TRACKING_URI, else runs/mlflow.db under
PNEUMORAY_RUNS); when its alias moves, the service switches to the new version by itself.
/v1/* requires 'Authorization: Bearer <token>': the token in PNEUMORAY_SERVE_TOKEN, else the one in
the run folder's serve-token file (generated at the first start, mode 0600); it prints where.
--no-auth turns that off, on a loopback address only.
Without --address (or RAY_ADDRESS) it starts a private local Ray, with Ray Serve's HAProxy in front
of replicas that serve HTTP themselves (serve.ingress: haproxy; --set serve.ingress=proxy for Serve's
Python proxy); with one it serves on that cluster, through its proxy, and ships this folder as the
working dir.
"""

import argparse
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path


def _port_free(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def main(argv=None):
    from pneumoray import serving, tracking
    from pneumoray.cli import add_profile_args, user_errors
    from pneumoray.profiles import load_profile

    parser = argparse.ArgumentParser(prog="python -m serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8000, help="HTTP port (default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s; 0.0.0.0 exposes it)")
    parser.add_argument("--model", help=f"MLflow model URI (default: the profile's serve.model, {serving.DEFAULT_MODEL})")
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS"),
                        help="Ray cluster to serve on (default: RAY_ADDRESS, else a private local Ray)")
    parser.add_argument("--no-dashboard", action="store_true", help="do not start the Ray dashboard (local Ray only)")
    parser.add_argument("--no-auth", action="store_true",
                        help="serve /v1/* without a bearer token (refused unless --host is a loopback address)")
    add_profile_args(parser)
    args = parser.parse_args(argv)

    with user_errors():
        profile = serving.serve_profile(load_profile(args.profile), args.overrides)
        serving.deployment_options(profile)  # a bad serve section fails here, before Ray starts
    if not (1 <= args.port <= 65535) or (not args.address and not _port_free(args.host, args.port)):
        print(f"error: cannot listen on {args.host}:{args.port} (in use or not allowed): pick another --port", file=sys.stderr)
        return 2
    model = args.model or profile["serve"]["model"]
    tracking_uri = tracking.tracking_uri()
    try:
        version = serving.check_source(model, tracking_uri)
    except serving.ModelNotFound as e:
        kept = serving.read_last_known_good(serving.last_known_good_dir(model, tracking_uri,
                                                                        profile["serve"]["last_known_good_dir"]))
        if kept is None:
            print(f"error: {e}", file=sys.stderr)
            return 2
        version = kept["version"]  # the replicas start from it and say they are degraded (/readyz)
        print(f"warning: {e}\nwarning: serving version {version}, the last one served on this machine, from its "
              "local copy until the registry names a version again", file=sys.stderr)
    try:
        token, token_source = serving.endpoint_token(profile["serve"]["token_env"], no_auth=args.no_auth, host=args.host)
    except serving.AuthSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from serve.app import application

    # Serve's proxy and replicas read these at their start (the header cap, the throughput-optimised
    # mode); they inherit this env from the local Ray. A value already set wins.
    env, haproxy_dir, runtime_env = dict(serving.SERVE_ENV), None, {}
    if not args.address and profile["serve"]["ingress"] == "haproxy":
        # Our own Ray: HAProxy in front, each replica serving HTTP itself (serving.haproxy_env)
        # short: HAProxy's socket paths (this folder, Ray's 56-character node id, the name) stop at 97 characters
        haproxy_dir = Path(tempfile.mkdtemp(prefix="pnr-ha-", dir="/tmp" if os.path.isdir("/tmp") else None))
        env.update(serving.haproxy_env(haproxy_dir, args.host))
        runtime_env["worker_process_setup_hook"] = serving.HAPROXY_SETUP_HOOK
    for key, value in env.items():
        os.environ.setdefault(key, value)
    if args.address:
        # Another cluster: ship this folder (serve/ and the page) like `ray job submit --working-dir .`.
        ray.init(address=args.address, runtime_env={"working_dir": os.getcwd()})
    else:
        # Our own Ray's HTTP servers read small bodies before dispatch (serving.PrefetchBody); a cluster's have their own env.
        os.environ[serving.PREFETCH_ENV] = serving.prefetch_env(profile["serve"], token)
        ray.init(address="local", include_dashboard=not args.no_dashboard, dashboard_host="127.0.0.1",
                 runtime_env=runtime_env or None)
    # Ctrl-C and SIGTERM both stop it, even when started with SIGINT ignored (nohup, a background job).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        serve.start(http_options={"host": args.host, "port": args.port})
        serve.run(application(profile, tracking_uri, model, token=token), name="pneumoray", route_prefix="/")
        print(f"pneumoray endpoint ready: http://{args.host}:{args.port}/ serving {model} (version {version}); "
              f"API docs at /docs; Ctrl-C stops it", flush=True)
        if haproxy_dir is not None:
            print(f"  HAProxy in front of the replicas; its stats page: http://{args.host}:"
                  f"{os.environ['RAY_SERVE_HAPROXY_STATS_PORT']}/stats", flush=True)
        print(f"  bearer token: {token_source}" + (f"  (curl -H \"Authorization: Bearer $(cat {token_source})\" ...)"
                                                  if token and not token_source.startswith("$") else ""), flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        print("shutting down the endpoint", flush=True)
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            _reap_children()
            if haproxy_dir is not None:
                shutil.rmtree(haproxy_dir, ignore_errors=True)
    return 0


def _reap_children(grace_s: float = 5.0) -> None:
    """End what is left of our process tree after ray.shutdown().

    Ctrl-C in a terminal signals the whole process group, so helpers (multiprocessing's resource tracker
    and forkserver, the dashboard's subprocesses) die with it; SIGTERM from systemd, docker or kill reaches
    this process alone, and they would outlive it. So: terminate them, and kill those that linger.
    """
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        try:
            child.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(children, timeout=grace_s)
    for child in alive:
        try:
            child.kill()
        except psutil.Error:
            pass


if __name__ == "__main__":
    sys.exit(main())
