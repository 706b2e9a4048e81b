"""Weights & Biases logging (the `wandb` package, in the test extra): `logging.wandb_mode=offline`
writes the run into `run_dir/wandb/offline-run-*` with the logged metrics, and never talks to a
server. A local HTTP server stands in for W&B (WANDB_BASE_URL, a dummy API key): an online run
sends it requests (checked once by hand: 8 requests), an offline one must send none."""

import http.server
import threading

import pytest

from megamora.config import load_config
from megamora.metrics import read_metrics
from test_train import tiny_overrides


@pytest.fixture
def fake_wandb_server(monkeypatch, tmp_path):
    """Requests that reached the stand-in W&B server (every wandb process reads the environment)."""
    requests: list[str] = []

    class Record(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(f"{self.command} {self.path}")
            self.send_response(503)
            self.end_headers()

        do_POST = do_PUT = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Record)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the run config alone decides
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):  # nothing outside tmp_path
        monkeypatch.setenv(var, str(tmp_path / var.lower()))
    yield requests
    server.shutdown()
    server.server_close()


def test_offline_mode_writes_the_run_locally_and_never_online(shared_data, tmp_path, fake_wandb_server):
    import wandb  # noqa: F401  (the test extra installs it: a missing package fails here, not a skip)

    from megamora.run import pretrain

    run_dir = tmp_path / "run"
    pretrain(load_config(None, tiny_overrides(shared_data, run_dir, "steps=2", "eval_every=0", "save_every=0",
                                              "logging.wandb_mode=offline", "logging.wandb_project=megamora-test")))
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((run_dir / "wandb").iterdir())
    logs = list(runs[0].glob("run-*.wandb"))
    assert len(logs) == 1 and b"train/loss" in logs[0].read_bytes()  # the metrics went into the local run
    assert [r["step"] for r in read_metrics(run_dir, "train")] == [1, 2]  # metrics.jsonl as always
    assert fake_wandb_server == []  # not one request to the server
