"""`deeprad export` and `deeprad predict`: `register(subparsers)` adds both to the main CLI."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from deeprad.core.errors import ConfigError

if TYPE_CHECKING:
    from deeprad.inference.hub_key import HubTrust, PinnedHub


def _hub_trust(args: argparse.Namespace, model: Path) -> HubTrust | None:
    """What a checkpoint's hub signature is checked against (None for an exported file, which
    has no signature); resolved before any work, and a skipped check is said out loud."""
    from deeprad.inference.checkpoint_file import CHECKPOINT_SUFFIXES
    from deeprad.inference.hub_key import SkipSignature, hub_trust

    if model.suffix not in CHECKPOINT_SUFFIXES:
        return None
    trust = hub_trust(model, args.hub_key, args.insecure_skip_signature)
    if isinstance(trust, SkipSignature):
        print(f"deeprad {args.command}: WARNING: --insecure-skip-signature: nothing checks that "
              f"the hub produced {model}; only its payload digest is checked, and whoever "
              "wrote the file can recompute that", file=sys.stderr)
    return trust


def _signed_by(hub: PinnedHub | None) -> str:
    return "NOT checked (--insecure-skip-signature)" if hub is None else hub.describe()


def _export(args: argparse.Namespace) -> int:
    from deeprad.inference.export import export_checkpoint

    trust = _hub_trust(args, args.checkpoint)
    result = export_checkpoint(args.checkpoint, args.format, args.output,
                               image_size=args.image_size, opset=args.opset, trust=trust)
    print(json.dumps({"output": str(result.path), "format": result.format,
                      "image_size": result.image_size, "checked_with": result.checked_with,
                      "max_abs_logit_diff": result.max_abs_diff,
                      "checkpoint_sha256": result.metadata["deeprad.checkpoint_sha256"],
                      "hub_signature": _signed_by(result.signed_by)},
                     indent=2))
    return 0


def _predict(args: argparse.Namespace) -> int:
    from deeprad.inference.predict import (
        output_format,
        predict_paths,
        render,
        require_torch_model,
        saliency_png,
    )
    from deeprad.inference.runtimes import open_runner

    if not args.inputs and args.saliency is None:
        raise ConfigError("give images or folders to predict on (or --saliency IMAGE)")
    if (args.saliency is None) != (args.saliency_out is None):
        raise ConfigError("--saliency IMAGE and --saliency-out PNG go together")
    fmt = output_format(args.output, args.format)
    trust = _hub_trust(args, args.model)
    runner = open_runner(args.model, args.device, trust)
    if args.saliency is not None:
        require_torch_model(runner)  # refuse before scoring a whole folder
    report = predict_paths(
        args.model, args.inputs, image_size=args.image_size, threshold=args.threshold,
        calibrate_folder=args.calibrate, target_sensitivity=args.target_sensitivity,
        positive_class=args.positive_class, batch_size=args.batch_size, runner=runner)
    if args.inputs:
        text = render(report, fmt)
        if args.output is None:
            sys.stdout.write(text)
        else:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text)
    flagged = sum(p.label for p in report.predictions)
    note = f"{len(report.predictions)} images, {flagged} flagged as tumour at threshold " \
           f"{report.threshold:.4f} ({report.threshold_source})"
    if report.calibration is not None:
        c = report.calibration
        spec = "n/a" if c.specificity is None else f"{c.specificity:.3f}"
        note += (f"; on {args.calibrate}: sensitivity {c.sensitivity:.3f} (target "
                 f"{c.target_sensitivity}), specificity {spec}, {c.positives}/{c.n} positives")
    if runner.checkpoint is not None:
        note += f"; checkpoint signature: {_signed_by(runner.checkpoint.signed_by)}"
    if args.output is not None:
        note += f"; written to {args.output}"
    if args.saliency is not None:
        png = saliency_png(runner, args.saliency, args.saliency_out, report.image_size,
                           args.saliency_layer)
        note += f"; Grad-CAM of {args.saliency} in {png}"
    print(note, file=sys.stderr)
    return 0


def _add_signature_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hub-key", type=Path, metavar="DIR|FILE",
                        help="the hub's public key folder (signing.pub, key-agreement.pub, "
                             "name) or its signing.pub, which must have signed the checkpoint "
                             "(default: the keys/hub folder `deeprad simulate` leaves in its "
                             "output, found from the checkpoint's folder up)")
    parser.add_argument("--insecure-skip-signature", action="store_true",
                        help="use a checkpoint without checking the hub's signature (its "
                             "payload digest is still checked); prints a warning")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the `export` and `predict` subcommands to the `deeprad` command."""
    exp = subparsers.add_parser(
        "export", help="export a checkpoint to ONNX, TorchScript or TensorRT",
        description="Verify a checkpoint's sha256 against its manifest and the hub's "
                    "signature over the manifest, export the model, and check the export's "
                    "outputs against PyTorch before writing it.")
    exp.add_argument("checkpoint", type=Path,
                     help="global.json / final.json manifest, or the .safetensors beside it")
    exp.add_argument("--format", required=True, choices=["onnx", "torchscript", "tensorrt"],
                     help="onnx (onnxruntime), torchscript, or tensorrt (needs a GPU and "
                          "pip install 'deeprad[gpu]')")
    exp.add_argument("--output", type=Path,
                     help="output file (default: beside the checkpoint, .onnx/.ts/.trt.ts)")
    exp.add_argument("--image-size", type=int, default=64,
                     help="pixels per side the model was trained on (default 64)")
    exp.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    _add_signature_options(exp)
    exp.set_defaults(func=_export)

    pred = subparsers.add_parser(
        "predict", help="tumour probabilities for DICOM / NIfTI / PNG images",
        description="Score images with a checkpoint (digest and hub signature verified) or "
                    "an exported model, preprocessed as in training. Prints CSV (path, "
                    "probability, label) unless --output names a .csv or .json file.")
    pred.add_argument("model", type=Path,
                      help="checkpoint (.json manifest or .safetensors), .onnx, or TorchScript "
                           "(.ts/.pt)")
    pred.add_argument("inputs", type=Path, nargs="*", help="image files or folders (recursive)")
    pred.add_argument("--output", type=Path, help="write here (.csv or .json) instead of stdout")
    pred.add_argument("--format", choices=["csv", "json"], help="override the output format")
    pred.add_argument("--image-size", type=int,
                      help="pixels per side, as in training (default: the export's, else 64)")
    pred.add_argument("--threshold", type=float,
                      help="probability at or above which an image is labelled tumour "
                           "(default 0.5)")
    pred.add_argument("--calibrate", type=Path, metavar="FOLDER",
                      help="labelled validation folder (<class>/<images>): choose the threshold "
                           "that reaches --target-sensitivity on it")
    pred.add_argument("--target-sensitivity", type=float, default=0.9,
                      help="share of tumours the calibrated threshold must find (default 0.9)")
    pred.add_argument("--positive-class", help="tumour class folder name in --calibrate "
                                               "(default: tumor/lesion/positive/..., or the "
                                               "second in sort order)")
    pred.add_argument("--saliency", type=Path, metavar="IMAGE",
                      help="write a Grad-CAM heat-map of this image (needs a checkpoint)")
    pred.add_argument("--saliency-out", type=Path, metavar="PNG", help="where the PNG goes")
    pred.add_argument("--saliency-layer", help="module name for Grad-CAM (default: the last "
                                               "feature block)")
    pred.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    pred.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    _add_signature_options(pred)
    pred.set_defaults(func=_predict)
