"""`deeprad simulate`: a whole federated study on this machine, no cluster."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _json_arg(text: str) -> dict[str, object]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def apply_recipe(args: argparse.Namespace) -> None:
    """Fill the data, model and training flags left out with the task's defaults: the demo's,
    the DP recipe's when a privacy budget is given, or the 3D segmentation study's."""
    from deeprad.simulate.config import BENCHMARKS, default_held_out, recipe_for

    private = args.dp_epsilon is not None or args.distributed_dp_epsilon is not None
    recipe = recipe_for(args.task, private)
    patch_given = args.patch_size is not None
    for name, default in vars(recipe).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if not patch_given and args.image_size <= args.patch_size:
        args.patch_size = 0  # volumes no larger than the default patch train whole
    if args.dataset is None:
        args.dataset = BENCHMARKS[args.task]
    if args.held_out_sites is None:
        args.held_out_sites = default_held_out(args.task, args.dataset)


def run(args: argparse.Namespace) -> int:
    """Check the whole configuration (strategy parameters included) before torch loads, then
    run the study."""
    from pydantic import ValidationError

    from deeprad.core.errors import ConfigError
    from deeprad.core.protocol import DatasetSpec, ModelSpec, StrategySpec, TrainConfig
    from deeprad.simulate.config import SimulationConfig, flag_error, site_count

    apply_recipe(args)
    try:
        if args.patch_size and args.task != "segmentation":
            raise ConfigError(f"--patch-size {args.patch_size}: patches are cut from 3D volumes; "
                              "use it with --task segmentation")
        if args.patch_size > args.image_size:
            raise ConfigError(f"--patch-size {args.patch_size}: larger than the volumes "
                              f"(--image-size {args.image_size}); give at most that, or 0 for "
                              "whole volumes")
        train = TrainConfig(local_epochs=args.local_epochs, batch_size=args.batch_size,
                            lr=args.lr, optimizer=args.optimizer, fedprox_mu=args.fedprox_mu,
                            patch_size=args.patch_size or None, seed=args.seed,
                            device=args.device)
        # The flag's bounds are the dataset message's own, checked before any worker starts.
        DatasetSpec(image_size=args.image_size)
    except ValidationError as exc:
        raise flag_error(exc) from None
    cfg = SimulationConfig(
        sites=site_count(args.dataset, args.sites, args.held_out_sites), rounds=args.rounds,
        task=args.task, held_out_sites=args.held_out_sites, leave_one_out=args.leave_one_out,
        model=ModelSpec(name=args.model, kwargs=args.model_kwargs, task=args.task),
        strategy=StrategySpec(name=args.strategy, params=args.strategy_params),
        train=train,
        dataset=args.dataset, normalize=args.normalize, positive_label=args.positive_label,
        samples_per_site=args.samples_per_site, image_size=args.image_size,
        seed=args.seed, output=args.output, workers=args.workers,
        baselines=not args.no_baselines, report_json=args.report_json,
        dp_epsilon=args.dp_epsilon, dp_delta=args.dp_delta, dp_accountant=args.dp_accountant,
        dp_noise_multiplier=args.dp_noise_multiplier, max_grad_norm=args.max_grad_norm,
        secure_aggregation=args.secure_aggregation, secagg_clip=args.secagg_clip,
        secagg_threat_model=args.secagg_threat_model,
        distributed_dp_epsilon=args.distributed_dp_epsilon,
        distributed_dp_clip=args.distributed_dp_clip,
    )
    # The model's name and kwargs, before any worker starts.
    from deeprad.core.models import build_model
    from deeprad.simulate.runner import run_simulation

    build_model(cfg.model, allow_code=True)
    run_simulation(cfg)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Add `simulate` to the `deeprad` command (its defaults come from the recipes when run)."""
    sim = sub.add_parser(
        "simulate", help="run a whole federated study locally (no cluster)",
        description="Simulated hospitals train in local worker processes with the real trainer "
                    "and aggregator; prints a per-round table and compares the federated model "
                    "with centralized and local-only training.")
    # protocol.TASKS, spelled out: importing the protocol would cost `deeprad --help` 0.25 s
    sim.add_argument("--task", choices=["classification", "segmentation"],
                     default="classification",
                     help="classification (default): tumour or not per 2D slice, scored by "
                          "AUROC; segmentation: lesion masks in 3D multi-sequence volumes, "
                          "scored by Dice, HD95 and lesion sensitivity at fixed false positives "
                          "per scan, with its own defaults (anatomy benchmark, unet3d, 48^3 "
                          "volumes, 32^3 training patches half of them centred on a lesion, "
                          "batch 2, Adam lr 3e-3, 12 local epochs, 10 rounds, 16 patients per "
                          "hospital before size skew, one hospital held out)")
    sim.add_argument("--sites", type=int,
                     help="number of hospitals that train (default 4 benchmark hospitals; with "
                          "--dataset, the folder's site entries less the held-out ones decide, "
                          "and a different --sites is refused)")
    sim.add_argument("--held-out-sites", type=int, metavar="K",
                     help="hospitals kept out of training and scored apart (default 1 for the "
                          "segmentation benchmark, else 0); a --dataset folder's last K entries "
                          "in name order")
    sim.add_argument("--leave-one-out", action="store_true",
                     help="also run the federated study once without each training hospital "
                          "and score it on that hospital's held-out split (about sites x the "
                          "federated study's time)")
    sim.add_argument("--rounds", type=int,
                     help="federated rounds (default 5; 10 with --task segmentation)")
    sim.add_argument("--model",
                     help="network: see `deeprad models`, or package.module:factory (default "
                          "tumor-cnn; tumor-jet with --dp-epsilon; unet3d with --task "
                          "segmentation)")
    sim.add_argument("--model-kwargs", type=_json_arg, default={}, metavar="JSON",
                     help="keyword arguments for the model factory (segmentation: in_channels "
                          "defaults to the data's number of sequences)")
    sim.add_argument("--dataset",
                     help="'phantom' (synthetic 2D slices, the classification default), "
                          "'anatomy' (synthetic lesions on real MNI152 anatomy, the segmentation "
                          "default), or a folder with one entry per hospital: a sub-folder "
                          "(<class>/<images>) or .npz file for classification, a sub-folder of "
                          "patient volumes and masks for segmentation")
    sim.add_argument("--normalize", choices=["image", "dataset", "none"], default="image",
                     help="a --dataset folder's intensity scaling: each image min-max scaled on "
                          "its own (image, default), one min-max over the site's whole set, "
                          "8-bit data divided by 255 (dataset), or as stored (none)")
    sim.add_argument("--positive-label", metavar="LABEL",
                     help="a --dataset folder's tumour class: the class folder's name, or a "
                          ".npz file's label values, comma-separated (default: a folder named "
                          "tumor/lesion/positive/..., else the second; .npz: any nonzero label)")
    sim.add_argument("--samples-per-site", type=int,
                     help="benchmark samples per hospital before size skew: phantom slices "
                          "(default 240) or anatomy patients (default 16)")
    sim.add_argument("--image-size", type=int,
                     help="pixels per side (default 64), or voxels per volume edge with --task "
                          "segmentation (default 48)")
    sim.add_argument("--strategy", default="fedavg", help="see `deeprad strategies`")
    sim.add_argument("--strategy-params", type=_json_arg, default={}, metavar="JSON",
                     help='strategy hyper-parameters, e.g. \'{"server_lr": 0.01}\'')
    sim.add_argument("--local-epochs", type=int,
                     help="epochs per round (default 3; 6 with --dp-epsilon; 12 with --task "
                          "segmentation)")
    sim.add_argument("--patch-size", type=int, metavar="N",
                     help="--task segmentation: train on N^3 patches cut from each volume, half "
                          "of them centred on a lesion voxel, and score volumes by sliding "
                          "windows of N^3 (default 32, or whole volumes when --image-size is "
                          "at most that; 0 trains on whole volumes)")
    sim.add_argument("--batch-size", type=int,
                     help="batch size (default 16; 64 with --dp-epsilon, the expected size of "
                          "the Poisson batches; 2 volumes with --task segmentation)")
    sim.add_argument("--lr", type=float,
                     help="local learning rate (default 3e-3, also with --task segmentation; "
                          "0.3 with --dp-epsilon)")
    sim.add_argument("--optimizer", choices=["adam", "sgd"],
                     help="local optimizer (default adam; sgd with momentum 0.9 with "
                          "--dp-epsilon)")
    sim.add_argument("--fedprox-mu", type=float, default=0.0, help="FedProx proximal weight")
    sim.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--workers", type=int, default=0,
                     help="worker processes (default: one per core, at most one per site)")
    sim.add_argument("--output", type=Path, default=Path("runs/demo"),
                     help="output folder: store, final checkpoint, report, plot")
    sim.add_argument("--report-json", type=Path, help="also write the report JSON here")
    sim.add_argument("--no-baselines", action="store_true",
                     help="skip the centralized and local-only comparisons")
    dp = sim.add_argument_group("differential privacy (record-level DP-SGD at every site)")
    dp.add_argument("--dp-epsilon", type=float, metavar="EPS",
                    help="the study's privacy budget ε; turns DP-SGD on, with the DP recipe's "
                         "defaults for the model and training flags not given. The noise is "
                         "calibrated to spend it over --rounds, and a round that would exceed it "
                         "never starts")
    dp.add_argument("--dp-delta", type=float, default=1e-5, help="budget δ (default 1e-5)")
    dp.add_argument("--dp-accountant", choices=["rdp", "pld"], default="rdp",
                    help="privacy accountant (default rdp)")
    dp.add_argument("--dp-noise-multiplier", type=float, metavar="Z",
                    help="fixed noise multiplier instead of the calibrated one (the budget may "
                         "then stop the study early)")
    dp.add_argument("--max-grad-norm", type=float,
                    help="per-record gradient clipping bound (default 1.5)")
    sa = sim.add_argument_group("secure aggregation")
    sa.add_argument("--secure-aggregation", action="store_true",
                    help="the hub learns only the sum of the updates (fedavg and the server "
                         "optimizers fedavgm, fedadam, fedyogi, fedadagrad); runs one worker "
                         "per site")
    sa.add_argument("--secagg-clip", type=float, default=1.0,
                    help="bound on each weighted update value before quantization (default 1)")
    sa.add_argument("--secagg-threat-model", choices=["semi-honest", "malicious"],
                    default="semi-honest",
                    help="what the exchange withstands, which sets the threshold t of n sites: "
                         "semi-honest (default) t = n/2+1 rounded down, a 3-site round survives "
                         "one dropout; malicious (the hub may lie about who dropped out) t = "
                         "2n/3+1 rounded down, a 3-site round survives none")
    sa.add_argument("--distributed-dp-epsilon", type=float, metavar="EPS",
                    help="distributed DP: every site adds its share of discrete Gaussian noise "
                         "before masking, so the sum is site-level (ε, --dp-delta)-DP against "
                         "the hub too, over --rounds; every site weighs 1; needs "
                         "--secure-aggregation (and takes the DP recipe's defaults)")
    sa.add_argument("--distributed-dp-clip", type=float, default=1.0, metavar="C",
                    help="distributed DP: L2 bound on each site's update (default 1)")
    sim.set_defaults(func=run)
