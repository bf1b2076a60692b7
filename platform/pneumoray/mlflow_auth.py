"""MLflow's own basic-auth app on the MLflow servers we start (the local stack, cluster.yaml's head).

Without it anyone who reaches the server can move `champion`, and every endpoint follows. The
credentials are one user, kept in a file of MLflow's own credentials format (the one MLflow clients
read from `~/.mlflow/credentials`), created once with a random password, mode 0600:

    [mlflow]
    mlflow_tracking_username = pneumoray
    mlflow_tracking_password = ...

Clients (jobs, Serve replicas, your shell) read MLflow's standard MLFLOW_TRACKING_USERNAME and
MLFLOW_TRACKING_PASSWORD, which the stack's `stack.env` and the Ray head's environment carry; the
server makes that user its admin (MLflow's auth config, MLFLOW_AUTH_ADMIN_PASSWORD) and signs its
forms with a key kept beside its user store. The MLflow UI asks for the same user and password.

    python -m pneumoray.mlflow_auth init [--credentials FILE]            # create it if missing; print where
    python -m pneumoray.mlflow_auth client-env [--credentials FILE]      # export lines for clients
    python -m pneumoray.mlflow_auth server-env --dir DIR [--credentials FILE]   # export lines for the server
"""

from __future__ import annotations

import argparse
import configparser
import os
import secrets
import shlex
from pathlib import Path

DEFAULT_CREDENTIALS = Path("~/.mlflow/credentials")
USERNAME = "pneumoray"
APP_NAME = "basic-auth"


class AuthSetupError(RuntimeError):
    """A credentials file that cannot be used as it is."""


def _write_private(path: Path, text: str) -> None:
    """Create ``path`` readable by its owner only; never overwrite (O_EXCL)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def ensure_credentials(path: str | Path = DEFAULT_CREDENTIALS) -> tuple[str, str]:
    """(username, password) from ``path``, which is created first with a random password if missing."""
    path = Path(path).expanduser()
    if not path.exists():
        try:
            _write_private(path, f"[mlflow]\nmlflow_tracking_username = {USERNAME}\n"
                                 f"mlflow_tracking_password = {secrets.token_urlsafe(24)}\n")
        except FileExistsError:  # created meanwhile by another process: read that one
            pass
    if path.stat().st_mode & 0o077:
        raise AuthSetupError(f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}): "
                             f"chmod 600 {path}")
    parser = configparser.ConfigParser()
    parser.read(path)
    try:
        return parser["mlflow"]["mlflow_tracking_username"], parser["mlflow"]["mlflow_tracking_password"]
    except KeyError:
        raise AuthSetupError(f"{path} needs a [mlflow] section with mlflow_tracking_username and "
                             "mlflow_tracking_password (delete it to have a new one made)") from None


def client_env(path: str | Path = DEFAULT_CREDENTIALS) -> dict[str, str]:
    """MLflow's standard variables for a client of the server."""
    username, password = ensure_credentials(path)
    return {"MLFLOW_TRACKING_USERNAME": username, "MLFLOW_TRACKING_PASSWORD": password}


def server_env(folder: str | Path, path: str | Path = DEFAULT_CREDENTIALS) -> dict[str, str]:
    """The variables `mlflow server --app-name basic-auth` needs: its auth config (user store in
    ``folder``, the credentials' user as admin, read-only for any other user), the admin's first
    password, and a static key for its CSRF protection (kept in ``folder``, the same across restarts)."""
    username, password = ensure_credentials(path)
    folder = Path(folder).expanduser().resolve()
    folder.mkdir(parents=True, exist_ok=True)
    key_file = folder / "flask-secret-key"
    if not key_file.exists():
        _write_private(key_file, secrets.token_hex(32))
    config = folder / "basic_auth.ini"
    config.write_text("[mlflow]\n"
                      "default_permission = READ\n"
                      f"database_uri = sqlite:///{folder / 'basic_auth.db'}\n"
                      f"admin_username = {username}\n"
                      "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
    return {"MLFLOW_AUTH_CONFIG_PATH": str(config), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
            "MLFLOW_FLASK_SERVER_SECRET_KEY": key_file.read_text().strip()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pneumoray.mlflow_auth", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["init", "client-env", "server-env"])
    parser.add_argument("--credentials", default=str(DEFAULT_CREDENTIALS), help="default: %(default)s")
    parser.add_argument("--dir", help="server-env: the server's folder for its user store and key")
    args = parser.parse_args(argv)
    try:
        if args.command == "init":
            username, _ = ensure_credentials(args.credentials)
            print(f"MLflow user {username}: {Path(args.credentials).expanduser()}")
            return
        if args.command == "server-env" and not args.dir:
            parser.error("server-env needs --dir")
        env = client_env(args.credentials) if args.command == "client-env" else server_env(args.dir, args.credentials)
    except AuthSetupError as e:
        raise SystemExit(f"error: {e}") from None
    print("\n".join(f"export {k}={shlex.quote(v)}" for k, v in env.items()))


if __name__ == "__main__":
    main()
