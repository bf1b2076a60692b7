"""The run folder is given to a process, not set in its environment mid-way (tracking.use_runs_dir)."""

import os

import mlflow

from pneumoray import tracking


def test_a_given_run_folder_holds_the_store_inside_the_block_and_not_after(tmp_path, monkeypatch):
    shell = tmp_path / "from-the-shell"
    monkeypatch.setenv("PNEUMORAY_RUNS", str(shell))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    environ = dict(os.environ)
    assert tracking.runs_dir() == shell.resolve()
    with tracking.use_runs_dir(tmp_path / "a") as a:
        assert tracking.runs_dir() == a == (tmp_path / "a").resolve() and a.is_dir()
        assert tracking.tracking_uri() == f"sqlite:///{a / 'mlflow.db'}"
        tracking.setup_mlflow("t")
        assert mlflow.get_tracking_uri() == tracking.tracking_uri()
        with tracking.use_runs_dir(tmp_path / "b"):  # nested: the inner one wins, then the outer is back
            assert tracking.runs_dir() == (tmp_path / "b").resolve()
        assert tracking.runs_dir() == a
    assert tracking.runs_dir() == shell.resolve()
    assert dict(os.environ) == environ  # nothing written to the environment stays (MLflow writes its URIs there)
    assert mlflow.get_tracking_uri() != f"sqlite:///{a / 'mlflow.db'}"  # and MLflow points away from the block


def test_a_tracking_server_in_the_environment_wins_unless_a_store_is_given(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    with tracking.use_runs_dir(tmp_path):
        assert tracking.tracking_uri() == "http://127.0.0.1:5999"  # the pipeline's rule: a server wins
    with tracking.use_runs_dir(tmp_path, tracking.local_store(tmp_path)):
        assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"  # a bench's own store
