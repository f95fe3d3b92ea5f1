"""`deeprad simulate --task segmentation` takes the 3D study's defaults (anatomy benchmark,
unet3d, 48^3 volumes, one hospital held out), lets every flag given win, and refuses a network
or a dataset of the other task with one line naming the flag, before anything trains."""

from __future__ import annotations

from pathlib import Path

import pytest

from deeprad.cli import apply_recipe, build_parser, main
from deeprad.core.errors import ConfigError
from deeprad.core.protocol import ModelSpec
from deeprad.simulate.config import SEG_RECIPE, SimulationConfig, site_count

pytestmark = pytest.mark.unit


def _resolved(*argv: str) -> dict[str, object]:
    args = build_parser().parse_args(["simulate", *argv])
    apply_recipe(args)
    return vars(args)


def test_segmentation_takes_the_3d_recipe() -> None:
    got = _resolved("--task", "segmentation")
    assert (got["model"], got["optimizer"], got["batch_size"]) == ("unet3d", "adam", 2)
    assert got["lr"] == SEG_RECIPE.lr
    assert (got["dataset"], got["image_size"], got["held_out_sites"]) == ("anatomy", 48, 1)
    assert got["local_epochs"] == SEG_RECIPE.local_epochs
    assert got["samples_per_site"] == SEG_RECIPE.samples_per_site
    assert (got["rounds"], got["patch_size"]) == (SEG_RECIPE.rounds, SEG_RECIPE.patch_size)
    assert _resolved("--task", "segmentation", "--patch-size", "0")["patch_size"] == 0  # whole
    # volumes no larger than the default patch train whole; a patch given is kept
    assert _resolved("--task", "segmentation", "--image-size", "24")["patch_size"] == 0
    assert _resolved("--task", "segmentation", "--image-size", "24", "--patch-size",
                     "16")["patch_size"] == 16
    # a privacy budget does not swap in the 2D DP recipe's network
    assert _resolved("--task", "segmentation", "--dp-epsilon", "8")["model"] == "unet3d"


def test_the_task_flag_offers_exactly_the_protocols_tasks() -> None:
    from deeprad.core.protocol import TASKS

    (task,) = [a for a in build_parser()._subparsers._group_actions[0]  # type: ignore[union-attr,index]
               .choices["simulate"]._actions if "--task" in a.option_strings]
    assert tuple(task.choices) == TASKS


def test_classification_keeps_the_demo_defaults() -> None:
    got = _resolved()
    assert (got["task"], got["dataset"], got["model"]) == ("classification", "phantom",
                                                           "tumor-cnn")
    assert (got["image_size"], got["samples_per_site"], got["held_out_sites"]) == (64, 240, 0)
    assert (got["rounds"], got["patch_size"]) == (5, 0)


def test_flags_given_win_over_the_3d_recipe() -> None:
    got = _resolved("--task", "segmentation", "--model", "segresnet3d", "--image-size", "32",
                    "--held-out-sites", "0", "--samples-per-site", "8", "--lr", "0.01")
    assert (got["model"], got["image_size"], got["held_out_sites"], got["samples_per_site"],
            got["lr"]) == ("segresnet3d", 32, 0, 8, 0.01)


@pytest.mark.parametrize("argv,says", [
    (["--task", "segmentation", "--model", "tumor-cnn"],
     "--model tumor-cnn is a classification network but --task is segmentation: pass --model "
     "one of unet3d, segresnet3d, dynunet3d (or leave --model out)"),
    (["--model", "unet3d"],
     "--model unet3d is a segmentation network but --task is classification: pass --model "
     "one of tumor-cnn, tumor-jet, densenet121, resnet18 (or leave --model out)"),
    (["--task", "segmentation", "--dataset", "phantom"],
     "--dataset phantom is the classification benchmark but --task is segmentation: leave "
     "--dataset out for the anatomy benchmark, or pass --task classification"),
    (["--task", "segmentation", "--held-out-sites", "-1"], "--held-out-sites must be >= 0, got -1"),
    (["--task", "segmentation", "--leave-one-out", "--sites", "1"],
     "--leave-one-out needs >= 2 training hospitals (--sites), got 1"),
    (["--task", "segmentation", "--samples-per-site", "2"],
     "--samples-per-site must be >= 6, got 2"),
    (["--patch-size", "32"],
     "--patch-size 32: patches are cut from 3D volumes; use it with --task segmentation"),
    (["--task", "segmentation", "--patch-size", "64"],
     "--patch-size 64: larger than the volumes (--image-size 48); give at most that, or 0 for "
     "whole volumes"),
    (["--task", "segmentation", "--patch-size", "4"],
     "--patch-size 4: input should be greater than or equal to 8"),
    # leave-one-out trains each hospital's records in S studies: ε would compose unreported
    (["--task", "segmentation", "--leave-one-out", "--dp-epsilon", "8"],
     "--leave-one-out with a privacy budget would train each hospital's records in several "
     "studies and spend more ε than the report shows: drop --leave-one-out or the DP flags"),
])
def test_a_mismatched_task_is_one_line_naming_the_flag(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str],
                                                       argv: list[str], says: str) -> None:
    out = tmp_path / "run"
    assert main(["simulate", *argv, "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"deeprad simulate: {says}\n"
    assert not out.exists()  # nothing ran


def test_the_model_spec_must_carry_the_study_task() -> None:
    with pytest.raises(ConfigError, match="model task 'classification' but --task segmentation"):
        SimulationConfig(task="segmentation", dataset="anatomy", samples_per_site=8,
                         model=ModelSpec(name="unet3d"))


def test_held_out_folders_are_counted_out_of_the_training_hospitals(tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        (tmp_path / name).mkdir()
    assert site_count(str(tmp_path), None, held_out=1) == 2
    with pytest.raises(ConfigError, match=r"holds 3 site folders .* pass --sites 2"):
        site_count(str(tmp_path), 3, held_out=1)
    with pytest.raises(ConfigError, match=r"--held-out-sites 3: .* at least one must train"):
        site_count(str(tmp_path), None, held_out=3)


def test_the_local_only_mean_averages_each_model_once_with_its_lesion_curve() -> None:
    from deeprad.simulate.report import mean_metrics

    a = {"loss": 1.0, "auroc": 0.5, "sensitivity": None, "specificity": 1.0, "accuracy": 0.5,
         "dice": 0.2, "hd95": 10.0, "lesion_sensitivity": {"1": 0.5, "8": 1.0}}
    b = {**a, "dice": 0.6, "hd95": None, "lesion_sensitivity": {"1": 0.25, "8": 0.5}}
    mean = mean_metrics([a, b])
    assert mean["dice"] == pytest.approx(0.4) and mean["hd95"] == 10.0
    assert mean["lesion_sensitivity"] == {"1": pytest.approx(0.375), "8": pytest.approx(0.75)}
    # a classification mean keeps its old shape: no segmentation fields
    assert "dice" not in mean_metrics([{k: v for k, v in a.items()
                                        if k not in ("dice", "hd95", "lesion_sensitivity")}])
