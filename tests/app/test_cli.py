"""The `iwae` command line, run in-process on a small slice of the real MNIST."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.settings import get_settings
from tests.support import require_mnist

TINY = ["--latent-dim", "2", "--hidden-dim", "16", "--device", "cpu"]


@pytest.fixture
def mnist_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IWAE_DATA_DIR", str(require_mnist()))
    monkeypatch.setenv("IWAE_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "study", "eval", "serve", "worker"):
        assert command in out


def test_train_defaults_follow_the_issue():
    args = build_parser().parse_args(["train", "--k", "50"])
    assert (args.objective, args.batch_size, args.lr, args.eval_k) == ("iwae", 100, 1e-3, 5000)
    assert (args.layers, args.device, args.precision) == (1, "auto", "fp32")


def test_train_then_eval_on_real_mnist(mnist_env, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--k",
            "3",
            "--epochs",
            "2",
            "--train-size",
            "300",
            "--eval-size",
            "20",
            "--eval-k",
            "10",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["out"] == str(out) and printed["epochs"] == 2 and printed["steps"] == 6
    assert printed["test_loglik"] < 0 and printed["eval_size"] == 20
    assert json.loads((out / "metrics.json").read_text()) == {
        k: v for k, v in printed.items() if k != "out"
    }

    code = main(["eval", "--model", str(out), "--k", "10", "--eval-size", "20", "--device", "cpu"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("test log-likelihood: ")
    assert "k=10, 20 test images" in lines[0]
    # Same model, images, k and seed as the training run's evaluation: the same number.
    assert json.loads(lines[-1])["test_loglik"] == pytest.approx(printed["test_loglik"])


def test_bad_configuration_is_a_message_not_a_traceback(mnist_env, tmp_path, capsys):
    code = main(["train", "--k", "0", "--out", str(tmp_path / "x"), *TINY])
    assert code == 2
    assert "k must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "name"),
    [(["--cuda-graphs"], "cuda_graphs"), (["--precision", "tf32"], "precision 'tf32'")],
)
def test_gpu_only_settings_on_the_cpu_are_a_message(mnist_env, tmp_path, capsys, flags, name):
    argv = ["train", "--k", "2", "--device", "cpu", *flags, "--out", str(tmp_path / "x")]
    assert main([*argv, *TINY]) == 2
    assert f"{name} needs a CUDA GPU" in capsys.readouterr().err


def test_eval_of_a_missing_checkpoint_says_which(mnist_env, tmp_path, capsys):
    code = main(["eval", "--model", str(tmp_path / "nothing.safetensors")])
    assert code == 2
    assert "nothing.safetensors" in capsys.readouterr().err


def test_burda_preset_with_options_given_over_it():
    from app.cli import _config

    args = build_parser().parse_args(["train", "--k", "50", "--preset", "burda"])
    config = _config(args, args.k)
    assert (config.batch_size, config.init, config.schedule, config.epochs) == (
        20,
        "burda",
        "burda",
        3280,
    )
    assert (config.eval_size, config.eval_k) == (10_000, 5000)

    # Given on the command line, a value wins even when it equals the default.
    argv = ["train", "--k", "50", "--preset", "burda", "--batch-size", "100", "--eval-k", "5000"]
    args = build_parser().parse_args([*argv, "--epochs", "2", "--eval-size", "100"])
    config = _config(args, args.k)
    assert (config.batch_size, config.epochs, config.eval_size) == (100, 2, 100)
    assert (config.init, config.schedule) == ("burda", "burda")
    # Without a preset, nothing changes.
    assert _config(build_parser().parse_args(["train", "--k", "5"]), 5).batch_size == 100


def test_snr_prints_json_per_k_with_slopes(mnist_env, tmp_path, capsys):
    out = tmp_path / "run"
    train = ["train", "--k", "2", "--train-size", "100", "--eval-size", "0", "--out", str(out)]
    assert main([*train, *TINY]) == 0
    capsys.readouterr()

    argv = ["snr", "--model", str(out), "--ks", "1", "10", "--draws", "16", "--images", "2"]
    assert main([*argv, "--device", "cpu"]) == 0

    printed = json.loads(capsys.readouterr().out)
    assert (printed["objective"], printed["draws"], printed["images"]) == ("iwae", 16, 2)
    assert [row["k"] for row in printed["snr"]] == [1, 10]
    for row in printed["snr"]:
        for network in ("encoder", "decoder"):
            assert set(row[network]) == {"median", "rms", "direction", "parameters"}
            assert row[network]["rms"] >= 0
    assert set(printed["slopes"]) == {"encoder", "decoder"}
    assert set(printed["slopes"]["encoder"]) == {"median", "rms", "direction"}

    for bad in (["--draws", "7"], ["--images", "0"], ["--ks", "0"]):
        assert main([*argv, "--device", "cpu", *bad]) == 2
    assert "at least 8 draws" in capsys.readouterr().err


def test_vr_iwae_and_k_schedule_options_reach_the_config(mnist_env, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--k",
            "3",
            "--objective",
            "vr-iwae-dreg",
            "--alpha",
            "0.25",
            "--k-schedule",
            "linear",
            "--epochs",
            "2",
            "--train-size",
            "200",
            "--eval-size",
            "0",
            "--out",
            str(out),
            *TINY,
        ]
    )
    assert code == 0
    assert json.loads(capsys.readouterr().out)["k_per_epoch"] == [1, 3]
    code = main(["eval", "--model", str(out), "--k", "5", "--eval-size", "5", "--device", "cpu"])
    config = json.loads(capsys.readouterr().out.splitlines()[-1])["config"]
    assert (config["objective"], config["alpha"], config["k_min"]) == ("vr-iwae-dreg", 0.25, 1)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--alpha", "0.5"], "alpha applies only"),
        (["--k-min", "2"], "k_min applies only"),
        (["study", "--objectives", "iwae", "vr-iwae", "--alpha", "1.0"], "alpha must lie"),
        (["study", "--ks", "1", "1"], "ks: repeated 1"),
        (["study", "--seeds", "-1"], "seeds: -1 is outside"),
        (
            ["study", "--ks", "1", "5", "--k-schedule", "linear", "--k-min", "2"],
            "cell vae-k1-s0: k_min must lie in [1, k=1]",
        ),
    ],
)
def test_options_that_do_not_apply_are_a_message(mnist_env, tmp_path, capsys, options, message):
    command = options[:1] if options[0] == "study" else ["train", "--k", "3"]
    rest = options[1:] if options[0] == "study" else options
    code = main([*command, *rest, "--out", str(tmp_path / "x"), *TINY])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any training


STUDY = ["--ks", "1", "2", "--objectives", "vae", "iwae", "--seeds", "0", "1"]
STUDY += ["--train-size", "200", "--epochs", "1", "--eval-size", "20", "--eval-k", "10"]
STUDY += ["--snr-draws", "10", "--device", "cpu"]


def test_study_runs_the_grid_writes_the_report_and_resumes(mnist_env, tmp_path, capsys):
    out = tmp_path / "study"
    assert main(["study", *STUDY, "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "cell 1/8: vae-k1-s0" in printed.err and "cell 8/8: iwae-k2-s1" in printed.err
    assert printed.out.startswith("# K study")

    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "succeeded"
    assert [c["name"] for c in results["cells"]] == [
        f"{o}-k{k}-s{s}" for o in ("vae", "iwae") for k in (1, 2) for s in (0, 1)
    ]
    assert [(r["objective"], r["k"], r["n"]) for r in results["summary"]] == [
        ("vae", 1, 2),
        ("vae", 2, 2),
        ("iwae", 1, 2),
        ("iwae", 2, 2),
    ]
    assert results["config"]["snr_draws"] == 10 and "k" not in results["config"]
    for cell in results["cells"]:
        assert (cell["config"]["train_size"], cell["config"]["seed"]) == (200, cell["seed"])
        assert cell["metrics"]["test_loglik"] < 0
        assert cell["metrics"]["gradient_snr"]["encoder"]["median"] >= 0
    assert (out / "report.html").read_text().startswith("<!DOCTYPE html>")
    assert (out / "study.md").read_text() == printed.out.removesuffix("\n")
    for name in ("loglik", "active_units", "seconds_per_epoch", "snr", "samples"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG")

    # Again: every cell is finished, nothing trains, the same numbers come out.
    assert main(["study", *STUDY, "--out", str(out)]) == 0
    assert "epoch 1/1" not in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text())["cells"] == results["cells"]


class _FakeService:
    """An HTTP server on a free port that records one POST and answers it."""

    def __init__(self, status: int, answer: dict) -> None:
        import http.server
        import threading

        seen = self.seen = {}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                seen.update(
                    path=self.path,
                    headers=dict(self.headers),
                    body=json.loads(self.rfile.read(length)),
                )
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Location", f"/studies/{answer.get('study_id')}")
                self.end_headers()
                self.wfile.write(json.dumps(answer).encode())

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.handle_request, daemon=True).start()

    def close(self) -> None:
        self.server.server_close()


def test_study_submit_posts_the_grid_and_prints_the_study_id(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("IWAE_API_TOKEN", raising=False)
    get_settings.cache_clear()
    service = _FakeService(202, {"study_id": "s123", "status": "queued"})
    argv = ["study", "--ks", "1", "50", "--seeds", "0", "1", "--epochs", "3", "--lr", "3e-4"]
    try:
        code = main([*argv, "--token", "secret", "--submit", service.url + "/"])
    finally:
        service.close()
        get_settings.cache_clear()

    assert code == 0
    assert capsys.readouterr().out == "s123\n"
    assert service.seen["path"] == "/studies"
    assert service.seen["headers"]["Authorization"] == "Bearer secret"
    body = service.seen["body"]
    assert (body["ks"], body["objectives"], body["seeds"]) == ([1, 50], ["vae", "iwae"], [0, 1])
    assert (body["epochs"], body["learning_rate"], body["snr_draws"]) == (3, 3e-4, 100)
    assert (body["layers"], body["latent_dim"], body["eval_k"]) == (1, 50, 5000)
    # The grid sets these per cell, and the service's workers choose the device.
    assert not {"k", "objective", "seed", "device", "preset"} & body.keys()
    assert not (tmp_path / "runs").exists()


def test_study_submit_uses_the_configured_token_and_reports_a_refusal(capsys, monkeypatch):
    monkeypatch.setenv("IWAE_API_TOKEN", "from-env")
    get_settings.cache_clear()
    service = _FakeService(422, {"detail": "ks x objectives x seeds: too many cells"})
    try:
        code = main(["study", "--preset", "burda", "--epochs", "2", "--submit", service.url])
    finally:
        service.close()
        get_settings.cache_clear()

    assert code == 2
    assert "answered 422" in capsys.readouterr().err
    assert service.seen["headers"]["Authorization"] == "Bearer from-env"
    body = service.seen["body"]
    # Under a preset, only what was given: the service applies the preset to the rest.
    assert (body["preset"], body["epochs"]) == ("burda", 2)
    assert "batch_size" not in body and "eval_k" not in body


def test_study_submit_refuses_a_device(capsys):
    assert main(["study", "--device", "cpu", "--submit", "http://127.0.0.1:9"]) == 2
    assert "--device applies to a local study" in capsys.readouterr().err
