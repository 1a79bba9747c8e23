"""The `iwae` command line, run in-process on a small slice of the real MNIST."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from app.cli import build_parser, main
from app.settings import get_settings
from models.data import MNIST_FILES

MNIST_DIR = Path(
    os.environ.get("IWAE_DATA_DIR") or Path(__file__).resolve().parents[3] / "shared/data/mnist"
)
TINY = ["--latent-dim", "2", "--hidden-dim", "16", "--device", "cpu"]


@pytest.fixture
def mnist_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not all((MNIST_DIR / f"{name}.gz").is_file() for name in MNIST_FILES):
        pytest.skip(f"real MNIST not found in {MNIST_DIR} (set IWAE_DATA_DIR)")
    monkeypatch.setenv("IWAE_DATA_DIR", str(MNIST_DIR))
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
        (["study", "--objective", "vr-iwae", "--alphas", "0.5", "1.0"], "alpha must lie"),
    ],
)
def test_options_that_do_not_apply_are_a_message(mnist_env, tmp_path, capsys, options, message):
    command = options[:1] if options[0] == "study" else ["train", "--k", "3"]
    rest = options[1:] if options[0] == "study" else options
    code = main([*command, *rest, "--out", str(tmp_path / "x"), *TINY])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # refused before any training
