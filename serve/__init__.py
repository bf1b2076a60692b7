"""The Ray Serve endpoint: `python -m serve --port 8000`, or `serve run serve/config.yaml`. See app.py."""
