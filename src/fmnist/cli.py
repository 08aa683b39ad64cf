"""The ``fmnist`` command: run the study's chain of notebooks, or one stage of it."""

from __future__ import annotations

import argparse
import sys

from fmnist.config import PARAMS_DIR, REPORT_NOTEBOOK, REPORTS_DIR, STAGES


def _run(arguments: argparse.Namespace) -> int:
    from fmnist.params import ParamsError
    from fmnist.pipeline import StageFailed, run_chain

    try:
        result = run_chain(arguments.params, arguments.out, stages=arguments.stage, log_output=not arguments.quiet)
    except (ParamsError, StageFailed, FileNotFoundError, ValueError) as error:
        print(f"fmnist run: error: {error}", file=sys.stderr)
        return 1
    total = sum(result.stage_seconds.values())
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.stage_seconds.items())
    print(f"fmnist run: done in {total:.0f} s ({timings}); artifacts in {result.out_dir}")
    if result.report:
        print(f"fmnist run: report at {result.report}")
    return 0


def _data(arguments: argparse.Namespace) -> int:
    from fmnist import data

    try:
        source, directory = data.locate_data_dir(allow_download=not arguments.offline)
        dataset = data.load_fashion_mnist(directory)
    except data.DataError as error:
        print(f"fmnist data: error: {error}", file=sys.stderr)
        return 1
    print(
        f"fmnist data: {len(dataset.y_train):,} training and {len(dataset.y_test):,} test images verified "
        f"({source}: {directory})"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fmnist", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run", help="run the study's notebooks in order with papermill and render the HTML report"
    )
    run.add_argument("--params", default=str(PARAMS_DIR), help="params profile directory (default: %(default)s)")
    run.add_argument("--out", default=str(REPORTS_DIR), help="where artifacts and the report go (default: %(default)s)")
    run.add_argument(
        "--stage",
        action="append",
        choices=(*STAGES, REPORT_NOTEBOOK),
        help="run only this stage (repeatable); default: every stage, then the report",
    )
    run.add_argument("--quiet", action="store_true", help="do not stream the notebooks' output")
    run.set_defaults(handler=_run)
    check = commands.add_parser("data", help="find and verify the four Fashion-MNIST files (checksums included)")
    check.add_argument("--offline", action="store_true", help="do not try the official download")
    check.set_defaults(handler=_data)
    return parser


def main(argv: list[str] | None = None) -> int:
    arguments = build_parser().parse_args(argv)
    return arguments.handler(arguments)


if __name__ == "__main__":
    raise SystemExit(main())
