"""Recipes, configuration validation, and the command line's mapping onto TrainConfig."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.errors import UserError
from training.recipes import FAST, TrainConfig, make_config
from training.resume import resume_config
from training.run import build_parser


def test_seed_recipe_is_the_notebook() -> None:
    config = make_config("seed")
    assert (config.epochs, config.batch_size, config.lr) == (20, 64, 0.005)
    assert (config.momentum, config.weight_decay, config.nesterov) == (0.9, 0.005, False)
    assert (config.schedule, config.augment, config.label_smoothing) == ("constant", "none", 0.0)
    assert (config.valid_size, config.split_seed, config.dropout) == (0.1, 1, 0.5)


def test_fast_recipe_and_overrides() -> None:
    config = make_config("fast", epochs=3, lr=None)  # None keeps the recipe's value
    assert config.recipe == "fast" and config.epochs == 3
    for key, value in FAST.items():
        if key != "epochs":
            assert getattr(config, key) == value, key


def test_unknown_recipe() -> None:
    with pytest.raises(UserError, match="unknown recipe 'slow'; choose one of seed, fast"):
        make_config("slow")


def test_validation_lists_every_problem() -> None:
    with pytest.raises(UserError) as info:
        make_config("seed", epochs=0, lr=-1.0, valid_size=1.0, schedule="cosine", augment="mixup")
    message = str(info.value)
    for fragment in (
        "--epochs must be at least 1",
        "--lr must be a positive number",
        "--valid-size must be between 0 and 1",
        "--schedule must be one of constant, onecycle",
        "--augment must be one of none, crop-flip",
    ):
        assert fragment in message


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"lr": float("nan")}, "--lr must be a positive number"),
        ({"lr": 1e39}, "--lr must be a positive number"),  # SGD: "cannot be converted ..."
        ({"momentum": -1.0}, "--momentum must be in [0, 1)"),
        ({"nesterov": True, "momentum": 0.0}, "--nesterov needs a --momentum above 0"),
        ({"weight_decay": -1.0}, "--weight-decay must be in [0, 1)"),
        ({"crop_padding": -1}, "--crop-padding must be from 0 to 31"),
        ({"crop_padding": 100_000}, "--crop-padding must be from 0 to 31"),  # a 1 TB pad
        ({"seed": 10**11}, "--seed must be in [0, 2**32)"),
        ({"split_seed": -1}, "--split-seed must be in [0, 2**32)"),
    ],
)
def test_values_torch_would_crash_on_are_refused_up_front(overrides: dict, message: str) -> None:
    """Each of these used to reach torch (SGD, random_, manual_seed) as a traceback, or, for a
    nan learning rate, to train to a nan loss and exit 0."""
    with pytest.raises(UserError) as info:
        make_config("fast", **overrides)
    assert message in str(info.value)


def test_config_round_trip(tmp_path: Path) -> None:
    config = make_config("fast", data_dir=tmp_path / "data", out_dir=tmp_path / "run")
    data = config.to_dict()
    assert data["data_dir"] == str(tmp_path / "data")  # plain data for the checkpoint
    assert TrainConfig.from_dict({**data, "dropped_field": 1}) == config


def test_parser_types_and_explicit_flags(tmp_path: Path) -> None:
    args = build_parser().parse_args(
        ["--recipe", "fast", "--epochs", "3", "--lr", "0.1", "--no-nesterov",
         "--data-dir", str(tmp_path), "--resume", str(tmp_path / "last.pt")]
    )  # fmt: skip
    assert args.recipe == "fast" and args.epochs == 3 and args.lr == 0.1
    assert args.nesterov is False and args.channels_last is None  # unset flags stay None
    assert args.data_dir == tmp_path and args.resume == tmp_path / "last.pt"
    assert args.batch_size is None
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--schedule", "cosine"])


def test_cudnn_benchmark_follows_the_recipe_unless_a_flag_says() -> None:
    assert make_config("seed").cudnn_benchmark is True
    assert make_config("fast").cudnn_benchmark is False  # the configuration measured
    on = build_parser().parse_args(["--recipe", "fast", "--cudnn-benchmark"])
    assert make_config("fast", cudnn_benchmark=on.cudnn_benchmark).cudnn_benchmark is True
    off = build_parser().parse_args(["--no-cudnn-benchmark"])
    assert make_config("seed", cudnn_benchmark=off.cudnn_benchmark).cudnn_benchmark is False


def test_the_gpu_warm_up_is_on_unless_turned_off_and_a_resume_may_turn_it_off() -> None:
    assert make_config("seed").gpu_warmup and make_config("fast").gpu_warmup
    off = build_parser().parse_args(["--no-gpu-warmup"])
    cfg = make_config("seed", gpu_warmup=off.gpu_warmup)
    assert cfg.gpu_warmup is False
    # Where the time goes, not what is computed: a resumed run may change it.
    resumed = resume_config({"config": make_config("seed").to_dict()}, cfg, {"gpu_warmup"})
    assert resumed.gpu_warmup is False
    # A checkpoint from before the setting existed resumes with it on.
    old = {k: v for k, v in make_config("seed").to_dict().items() if k != "gpu_warmup"}
    assert resume_config({"config": old}, make_config("seed"), set()).gpu_warmup is True
