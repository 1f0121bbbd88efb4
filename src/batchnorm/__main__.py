"""Command line: ``python -m batchnorm <command>`` (also installed as ``batchnorm``).

A thin dispatcher: each subcommand's work lives in its own module, imported only when that
subcommand runs (so ``--help`` stays fast and needs no optional dependency).
"""

from __future__ import annotations

import argparse
import sys


def _run_demo(args: argparse.Namespace) -> int:
    from batchnorm.demo import run_demo

    run_demo(epochs=args.epochs, seed=args.seed, out_dir=args.out, progress=True)
    return 0


def _run_bench(args: argparse.Namespace) -> int:
    from batchnorm.bench import run

    run(args)
    return 0


def _run_inspect(args: argparse.Namespace) -> int:
    from batchnorm.health import inspect_files

    report = inspect_files(args.model, args.data, batch_size=args.batch_size, plot=args.plot)
    return 1 if any(health.stale for health in report) else 0


def build_parser() -> argparse.ArgumentParser:
    from batchnorm.bench import add_arguments, positive_int  # torch only: no optional dependency

    parser = argparse.ArgumentParser(
        prog="python -m batchnorm",
        description="The Keras BatchNormalization layer as a PyTorch module: command-line tools.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = commands.add_parser(
        "demo",
        help="train a small CNN on scikit-learn's digits and show what the layer does",
        description="Train a small channels-last CNN with BatchNormalization(axis=-1) on the 8x8 "
        "digits shipped with scikit-learn (CPU, well under a minute), then show: "
        "(a) inference-mode accuracy vs training mode on small batches, "
        "(b) fine-tuning with a frozen backbone leaves its moving statistics unchanged, "
        "(c) a PNG figure of the training curve and of moving statistics converging.",
    )
    demo.add_argument(
        "--epochs", type=positive_int, default=25, metavar="N", help="training epochs (default: %(default)s)"
    )
    demo.add_argument(
        "--seed",
        type=int,
        default=0,
        metavar="S",
        help="random seed for the split, initialization and shuffling (default: %(default)s)",
    )
    demo.add_argument(
        "--out", default="demo-out", metavar="DIR", help="directory for the figure (default: %(default)s)"
    )
    demo.set_defaults(func=_run_demo)

    bench = commands.add_parser(
        "bench",
        help="time the layer against torch's native batch norm, Keras 3 and a plain copy",
        description="Time BatchNormalization side by side, in one process, with "
        "torch.nn.functional.batch_norm on its best zero-copy layout, Keras 3's layer on "
        "the torch backend and the copy floor; print a table (and JSON with --json).",
    )
    add_arguments(bench)
    bench.set_defaults(func=_run_bench)

    inspect = commands.add_parser(
        "inspect",
        help="report how far each batch normalization's moving statistics are from the data's",
        description="Load a model saved whole with torch.save(model) (a pickle: only files you trust) "
        "and a tensor saved with torch.save (or an (inputs, mask) pair, or a dict of the model's "
        "arguments, split along dimension 0), and print each batch normalization's health: mean "
        "shift, variance ratio, non-finite and dead channels, renorm r/d. Exit status 1 if a "
        "layer is stale. A state_dict checkpoint holds no model to run: save the model itself.",
    )
    inspect.add_argument("model", metavar="MODEL", help="a file written by torch.save(model)")
    inspect.add_argument("data", metavar="DATA", help="a file written by torch.save(tensor | (inputs, mask) | dict)")
    inspect.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        metavar="N",
        help="batch size of the pass (default: %(default)s)",
    )
    inspect.add_argument("--plot", metavar="PATH", help="also write a PNG of each layer's channels")
    inspect.set_defaults(func=_run_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
