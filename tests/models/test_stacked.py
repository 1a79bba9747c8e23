"""Tests for models.stacked: every member of a stacked group ends where its solo run would.

The oracle is the solo run itself: `models.training.train_step` on the fast path for the
step-level tests (float64, so that batched and single products agree to ~1e-15 per step
and 1e-10 after several Adam steps; a wrong index or a member's draws taken from another
member's generator shows as an O(1) difference), and `models.training.train` for the whole
loop in float32 (checkpoints, generator states, resume, a diverging member).
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from models.checkpoint import load_checkpoint
from models.config import OBJECTIVES, VR_OBJECTIVES, TrainConfig
from models.curve import CurveRecorder, CurveSpec, read_curve
from models.data import Mnist
from models.estimators import log_likelihood
from models.fastpath import FastPath
from models.objectives import sampling_plan
from models.progress import Progress
from models.stacked import (
    StackedFastPath,
    draw_noise,
    stack_groups,
    stack_key,
    train_stacked,
)
from models.training import train, train_step
from tests.models.conftest import TINY_1, build_tiny_model

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4


def member_config(objective: str, seed: int, **changes: object) -> TrainConfig:
    options: dict[str, object] = {"m": 2} if objective in ("miwae", "piwae") else {}
    if objective in VR_OBJECTIVES:
        options["alpha"] = 0.3
    fields = {"k": 3, "model": TINY_1, "device": "cpu", **options, **changes}
    return TrainConfig(objective=objective, seed=seed, **fields)


def solo_steps(config: TrainConfig, images: torch.Tensor) -> tuple[list[torch.Tensor], list]:
    """STEPS fast-path steps of one float64 run on images [STEPS, B, D]: its parameters and
    bounds."""
    model = build_tiny_model(seed=config.seed)
    optimizer = torch.optim.Adam(model.parameters(), eps=1e-4, fused=True)
    generator = torch.Generator().manual_seed(config.seed)
    fast, loss_sum = FastPath(model), torch.zeros((), dtype=torch.float64)
    losses = []
    for batch in images:
        before = loss_sum.clone()
        train_step(
            config, model, fast, optimizer, generator, contextlib.nullcontext(), loss_sum, batch, 3
        )
        losses.append(before - loss_sum)
    return [p.detach().clone() for p in model.parameters()], losses


def stacked_steps(configs: list[TrainConfig], images: torch.Tensor) -> tuple[list, torch.Tensor]:
    """The same steps of the same runs, stacked: each member's parameters, and its bounds'
    batch means [STEPS, G]."""
    models = [build_tiny_model(seed=c.seed) for c in configs]
    optimizers = [torch.optim.Adam(m.parameters(), eps=1e-4, fused=True) for m in models]
    generators = [torch.Generator().manual_seed(c.seed) for c in configs]
    path = StackedFastPath(models)
    means = []
    draws = sampling_plan(configs[0])[0]
    for batch in images:
        grey = batch.expand(len(configs), *batch.shape)  # [G, B, D]
        x, eps = draw_noise(grey, generators, draws, TINY_1.latent_dim)
        bound = path.set_gradients(x, eps, configs)  # [G, B]
        for optimizer in optimizers:
            optimizer.step()
        means.append(bound.mean(1))
    params = [[p.detach().clone() for p in m.parameters()] for m in models]
    return params, torch.stack(means)


GROUPS = {objective: [objective] * 3 for objective in OBJECTIVES}
# Objectives whose steps have the same shapes share a group: differing stop-gradients on q.
GROUPS["mixed"] = ["vae", "iwae-dreg", "iwae", "iwae-stl"]


@pytest.mark.parametrize("objectives", GROUPS.values(), ids=GROUPS.keys())
def test_each_member_equals_its_solo_run_in_float64(objectives: list[str]) -> None:
    configs = [member_config(o, seed) for seed, o in enumerate(objectives)]
    generator = torch.Generator().manual_seed(11)
    images = torch.rand(STEPS, 5, 6, generator=generator, dtype=torch.float64)  # [steps, B, D]

    params, means = stacked_steps(configs, images)

    for g, config in enumerate(configs):
        want_params, want_losses = solo_steps(config, images)
        for got, want in zip(params[g], want_params, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(means[:, g], torch.stack(want_losses), rtol=1e-10, atol=1e-10)
    # Each member moved from its start and the seeds gave different runs: the test can fail.
    assert not torch.equal(params[0][0], params[1][0])
    assert not torch.equal(params[0][0], build_tiny_model(seed=0).encoders[0].net[0].weight)


def test_stack_groups_share_shapes_and_leave_the_rest_alone() -> None:
    configs = [
        member_config("iwae", 0),
        member_config("vae", 1),
        member_config("iwae", 0, k=4),
        member_config("miwae", 0),  # 2 x 3 draws: not the shape of K=3
        member_config("iwae-dreg", 2, learning_rate=3e-4, epochs=3),
        member_config("iwae", 3, k_schedule="linear"),  # K changes: alone
        member_config("iwae", 4, k_schedule="linear"),
    ]

    assert stack_groups(configs) == [[0, 1, 4], [2], [3], [5], [6]]
    assert stack_key(configs[5]) is None
    # 3 samples x batch 100 per member: two members fit in 600 rows, the third starts a group.
    assert stack_groups(configs, max_rows=600) == [[0, 1], [2], [3], [4], [5], [6]]
    with pytest.raises(ValueError, match="one stack_key"):
        train_stacked([configs[0], configs[2]], torch.rand(10, 6))


def float32_configs(train_config: TrainConfig) -> list[TrainConfig]:
    """Three runs of 2 epochs of 4 steps: two seeds of IWAE and a DReG run with Burda's
    learning-rate decay."""
    return [
        train_config.with_changes(seed=0),
        train_config.with_changes(seed=1),
        train_config.with_changes(seed=2, objective="iwae-dreg", schedule="burda"),
    ]


def assert_same_run(got_path: Path, want_path: Path) -> None:
    """Two checkpoints of one run: same weights and Adam state to fp32 rounding, and the
    same generator state, epochs and steps exactly."""
    got, want = load_checkpoint(got_path), load_checkpoint(want_path)
    assert got.config == want.config
    assert (got.state.epoch, got.state.step) == (want.state.epoch, want.state.step)
    assert torch.equal(got.generator_state, want.generator_state)
    for name, value in want.model_state.items():
        torch.testing.assert_close(got.model_state[name], value, rtol=1e-5, atol=1e-6, msg=name)
    for index, values in want.optimizer_state["state"].items():
        torch.testing.assert_close(
            got.optimizer_state["state"][index], values, rtol=1e-4, atol=1e-8
        )


def solo_checkpoints(configs: list[TrainConfig], data: Mnist, folder: Path) -> list[Path]:
    paths = [folder / f"solo{i}.safetensors" for i in range(len(configs))]
    for config, path in zip(configs, paths, strict=True):
        train(config, data.train_images, checkpoint_path=path)
    return paths


def test_the_group_trains_each_member_as_train_does(
    tmp_path: Path, train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    configs = float32_configs(train_config)
    want = solo_checkpoints(configs, synthetic_mnist, tmp_path)
    paths = [tmp_path / f"member{i}.safetensors" for i in range(3)]
    seen: list[list[Progress]] = [[], [], []]
    # Learning curves draw from their own generator: the members train as without them.
    curve_x = synthetic_mnist.test_images[:4].round()
    curves = [
        CurveRecorder(CurveSpec(every=5, size=4, k=3), curve_x, c.seed, tmp_path / f"c{i}.json")
        for i, c in enumerate(configs)
    ]

    results = train_stacked(
        configs,
        synthetic_mnist.train_images,
        checkpoint_paths=paths,
        callbacks=[[s.append] for s in seen],
        epoch_ends=curves,
    )

    test_x = torch.bernoulli(
        synthetic_mnist.test_images, generator=torch.Generator().manual_seed(0)
    )
    for config, result, got_path, want_path, progress in zip(
        configs, results, paths, want, seen, strict=True
    ):
        assert result.error is None and not result.stopped
        assert (result.epochs_done, result.steps) == (2, 8)
        assert result.train_seconds > 0
        assert [(p.epoch, p.done) for p in progress] == [
            (e, s) for e in (1, 2) for s in (1, 2, 3, 4)
        ]
        assert_same_run(got_path, want_path)
        assert [p["epoch"] for p in read_curve(curves[configs.index(config)].path)] == [1, 2]
        solo = train(config, synthetic_mnist.train_images, checkpoint_path=want_path).model
        bounds = [
            log_likelihood(m, test_x, 50, generator=torch.Generator().manual_seed(1)).log_px
            for m in (result.model, solo)
        ]
        torch.testing.assert_close(bounds[0], bounds[1], rtol=1e-5, atol=1e-5)


def test_a_diverging_member_fails_alone(
    tmp_path: Path, train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    configs = float32_configs(train_config)
    configs[1] = configs[1].with_changes(learning_rate=1e30)  # its weights overflow at once
    want = solo_checkpoints([configs[0], configs[2]], synthetic_mnist, tmp_path)
    paths = [tmp_path / f"member{i}.safetensors" for i in range(3)]

    first, diverged, last = train_stacked(
        configs, synthetic_mnist.train_images, checkpoint_paths=paths
    )

    assert diverged.error is not None and diverged.error.startswith("diverged")
    assert diverged.epochs_done == 0 and not paths[1].exists()
    for result, got_path, want_path in zip((first, last), (paths[0], paths[2]), want, strict=True):
        assert result.error is None and result.epochs_done == 2
        assert_same_run(got_path, want_path)


def test_a_stopped_member_resumes_from_its_own_checkpoint(
    tmp_path: Path, train_config: TrainConfig, synthetic_mnist: Mnist
) -> None:
    """Member 1 stops in its second epoch while the others finish; the group run again
    resumes it alone from its first epoch's checkpoint, and it ends as if never stopped."""
    configs = float32_configs(train_config)
    want = solo_checkpoints(configs, synthetic_mnist, tmp_path)
    paths = [tmp_path / f"member{i}.safetensors" for i in range(3)]

    def stop(progress: Progress) -> bool:
        return (progress.epoch, progress.done) == (2, 2)

    stopped = train_stacked(
        configs, synthetic_mnist.train_images, checkpoint_paths=paths, callbacks=[[], [stop], []]
    )
    assert [(r.stopped, r.epochs_done) for r in stopped] == [(False, 2), (True, 1), (False, 2)]
    assert load_checkpoint(paths[1]).state.epoch == 1

    resumed = train_stacked(configs, synthetic_mnist.train_images, checkpoint_paths=paths)

    assert [(r.stopped, r.epochs_done) for r in resumed] == [(False, 2)] * 3
    for got_path, want_path in zip(paths, want, strict=True):
        assert_same_run(got_path, want_path)
