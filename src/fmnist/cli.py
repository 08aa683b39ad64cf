"""The fmnist command: run the study, classify and serve images, benchmark the classifier.

Examples:
  fmnist run                          the whole study into reports/, then reports/report.html
  fmnist run --params params/smoke --out build/smoke   the tiny profile (about 2 minutes)
  fmnist classify shirt.jpg           top classes of an image (no TensorFlow needed)
  fmnist serve                        the page and JSON API on http://127.0.0.1:8000/
  fmnist runs                         every published run (reports/, build/*) with its results
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from fmnist import __version__
from fmnist.config import ALL_STAGES, PARAMS_DIR, REPORTS_DIR


def bounded_int(low: int, high: int, what: str):
    """An argparse type: a whole number from ``low`` to ``high``, or a usage error that says so."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number ({what}: {low} to {high})") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{value} is out of range ({what}: {low} to {high})")
        return value

    return parse


CLASSIFY_EXIT_CODES = """exit codes:
  0  every image was classified
  1  at least one image could not be read or decoded (each says why on stderr; the others are still classified)
  2  usage error, or the model could not be loaded"""
SERVE_EXIT_CODES = """exit codes:
  0  stopped with Ctrl-C
  2  usage error, the model could not be loaded, or the address could not be bound

TLS: --certfile cert.pem --keyfile key.pem serve HTTPS, which browsers on other machines need for the camera.
A local test certificate: openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj /CN=fmnist \\
  -keyout key.pem -out cert.pem"""


def _run(arguments: argparse.Namespace) -> int:
    from fmnist.params import ParamsError
    from fmnist.pipeline import StageFailed, run_chain

    try:
        result = run_chain(
            arguments.params,
            arguments.out,
            stages=arguments.stage,
            echo="none" if arguments.quiet else "all" if arguments.verbose else "progress",
            fresh=arguments.fresh,
        )
    except (ParamsError, StageFailed, FileNotFoundError, ValueError) as error:
        print(f"fmnist run: error: {error}", file=sys.stderr)
        if isinstance(error, StageFailed):
            print("fmnist run: the output directory is unchanged; rerun the same command to resume.", file=sys.stderr)
        return 1
    total = sum(result.stage_seconds.values())
    timings = ", ".join(f"{stage} {seconds:.0f} s" for stage, seconds in result.stage_seconds.items()) or "none"
    kept = f"; kept as current: {', '.join(result.kept)}" if result.kept else ""
    print(f"fmnist run: run {result.run_id} done in {total:.0f} s (ran: {timings}{kept})")
    print(f"fmnist run: artifacts in {result.out_dir} (each stage's whole output in {result.out_dir}/logs/)")
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


def _classify(arguments: argparse.Namespace) -> int:
    import json

    from fmnist.inference import Classifier, ModelError
    from fmnist.preprocess import ImageError

    try:
        classifier = Classifier(arguments.model)
    except (ModelError, ImportError) as error:
        print(f"fmnist classify: error: {error}", file=sys.stderr)
        return 2
    failures = 0
    for path in arguments.images:
        try:
            prediction = classifier.classify(path, top_k=arguments.top_k)
        except (ImageError, OSError) as error:
            # One line per file that cannot be used; the remaining files are still classified.
            failures += 1
            message = error if isinstance(error, ImageError) else f"cannot read it ({error.strerror or error})"
            print(f"{path}: error: {message}", file=sys.stderr)
            continue
        if arguments.json:
            print(json.dumps({"file": path, **prediction.as_dict()}))
        else:
            ranked = ", ".join(f"{name} {probability:.1%}" for name, probability in prediction.classes)
            print(f"{path}: {ranked}  ({prediction.inference_ms:.3f} ms)")
    return 1 if failures else 0


def _serve(arguments: argparse.Namespace) -> int:
    from fmnist.inference import ModelError
    from fmnist.serve import Limits, serve

    try:
        serve(
            arguments.model,
            host=arguments.host,
            port=arguments.port,
            verbose=arguments.verbose,
            certfile=arguments.certfile,
            keyfile=arguments.keyfile,
            limits=Limits(max_connections=arguments.max_connections),
        )
    except (ModelError, ImportError, OSError) as error:
        print(f"fmnist serve: error: {error}", file=sys.stderr)
        return 2
    return 0


def _bench(arguments: argparse.Namespace) -> int:
    from pathlib import Path

    from fmnist.config import ArtifactLayout

    layout = ArtifactLayout(arguments.out)
    needed = [layout.model, layout.litert_model("float32"), layout.litert_model("int8")]
    if arguments.serve_model == "shipped":
        needed.append(layout.shipped_model)
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        print(
            f"fmnist bench: error: missing {', '.join(missing)}; run the study first "
            f"(`fmnist run --out {arguments.out}`, stages 03_train and 05_deploy).",
            file=sys.stderr,
        )
        return 2
    from fmnist import bench, data

    images = data.load_fashion_mnist().x_test[:512]
    out = Path(arguments.json) if arguments.json else layout.bench
    results = bench.run_benchmark(
        layout.model,
        {"float32": layout.litert_model("float32"), "int8": layout.litert_model("int8")},
        images,
        out=out,
        seconds=arguments.seconds,
        clients=arguments.clients,
        rate_per_client=arguments.rate,
        closed_clients=arguments.closed_clients,
        slow_clients=arguments.slow_clients,
        serve_model=arguments.serve_model,
        serve_file=layout.shipped_model if arguments.serve_model == "shipped" else None,
        runs=arguments.runs,
        keras_runs=max(20, arguments.runs // 10),
    )
    print(bench.format_results(results))
    print(f"fmnist bench: figures written to {out}")
    return 0


def _loadtest(arguments: argparse.Namespace) -> int:
    from fmnist.bench import format_serving, sample_photo
    from fmnist.inference import DEFAULT_MODEL
    from fmnist.io import write_json
    from fmnist.loadtest import run_loadtest, synthetic_article

    model = arguments.model or DEFAULT_MODEL
    if not os.path.isfile(model):
        print(f"fmnist loadtest: error: {model}: model file not found; give --model PATH to a .tflite file.")
        return 2
    figures = run_loadtest(
        model,
        sample_photo(synthetic_article()),
        paced_clients=arguments.clients,
        rate_per_client=arguments.rate,
        closed_clients=arguments.closed_clients,
        seconds=arguments.seconds,
        slow_count=arguments.slow_clients,
        say=lambda message: print(f"[loadtest] {message}", file=sys.stderr, flush=True),
    )
    figures = {"model": os.path.basename(model), **figures}
    print(format_serving(figures))
    if arguments.json:
        write_json(arguments.json, figures)
        print(f"fmnist loadtest: figures written to {arguments.json}")
    return 0


def _latency(arguments: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fmnist import bench, data
    from fmnist.inference import ModelError
    from fmnist.io import write_json

    try:
        images = data.load_fashion_mnist().x_test[:1]
        figures = bench.litert_latency([Path(path) for path in arguments.models], images, runs=arguments.runs)
    except (ModelError, data.DataError) as error:
        print(f"fmnist latency: error: {error}", file=sys.stderr)
        return 2
    if arguments.json:
        write_json(arguments.json, figures)
    print(json.dumps(figures, indent=2))
    return 0


def _verify_run(arguments: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from fmnist import data, experiments, runs
    from fmnist.config import ArtifactLayout
    from fmnist.io import write_json

    layout = ArtifactLayout(arguments.out)
    try:
        unfinished = runs.work_dir_for(layout.root)
        if (unfinished / runs.RUN_FILE).is_file():
            # That run started from a copy of the directory and replaces it when it completes.
            raise ValueError(
                f"an unfinished `fmnist run` in {unfinished} will replace {layout.root} when it completes, and "
                f"this check with it: finish that run (rerun its command) or delete {unfinished}, then verify."
            )
        dataset = data.load_fashion_mnist()
        # No `fmnist run` may publish over the directory while the check writes into it.
        with runs.exclusive(layout.root), tempfile.TemporaryDirectory(prefix="fmnist-verify-") as scratch:
            record = experiments.verify_run(
                arguments.recipe,
                arguments.seed,
                files=layout.experiments,
                scratch=Path(scratch),
                x_train_full=dataset.x_train,
                y_train_full=dataset.y_train,
                x_test=dataset.x_test,
                y_test=dataset.y_test,
                split={"validation_size": arguments.validation_size, "train_subset": arguments.train_subset},
                restore=arguments.restore,
                verbose=2 if arguments.verbose else 0,
            )
            # The latest check of each run is kept beside the runs, where the report finds it.
            write_json(layout.experiments.verification(arguments.recipe, arguments.seed), record)
            if record["restored_model"]:
                # Not the bytes 06_experiments wrote (Keras stamps the date): its record stops vouching for them.
                runs.release_output(layout, layout.experiments.models / record["restored_model"])
    except (FileNotFoundError, ValueError, data.DataError) as error:
        print(f"fmnist verify-run: error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(record, indent=2))
    if arguments.json:
        write_json(arguments.json, record)
    verdict = "reproduced exactly" if record["identical"] else f"differs in {', '.join(record['differences'])}"
    print(f"fmnist verify-run: {arguments.recipe} seed {arguments.seed}: {verdict} ({record['minutes']} min)")
    if record["restored_model"]:
        print(f"fmnist verify-run: its model is back in {layout.experiments.models / record['restored_model']}")
    elif arguments.restore and record["identical"]:
        print("fmnist verify-run: its model was already on disk; left as it was")
    return 0 if record["identical"] else 1


def _runs(arguments: argparse.Namespace) -> int:
    from fmnist import run_index
    from fmnist.io import write_text

    roots = arguments.root or [str(root) for root in run_index.DEFAULT_ROOTS]
    missing = [root for root in arguments.root or [] if not os.path.isdir(root)]
    if missing:
        print(f"fmnist runs: error: {', '.join(missing)}: no such directory", file=sys.stderr)
        return 2
    rows = run_index.index_runs(roots)
    if rows:
        print(run_index.format_table(rows))
    else:
        print(
            f"fmnist runs: no published run (a directory with manifest.json) below {', '.join(roots)}", file=sys.stderr
        )
    if arguments.csv:
        write_text(arguments.csv, run_index.csv_text(rows))
        print(f"fmnist runs: {len(rows)} row(s) written to {arguments.csv}", file=sys.stderr)
    return 0


def _tune_worker(arguments: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from fmnist.tuning import worker_environment

    # TensorFlow sizes its thread pools when it starts: set them before fmnist.tuning imports it.
    for name, value in worker_environment(arguments.threads).items():
        os.environ.setdefault(name, value)
    from fmnist import tuning
    from fmnist.data import DataError

    try:
        return tuning.run_worker(
            arguments.oracle,
            arguments.id,
            Path(arguments.directory),
            arguments.data_dir,
            tensorboard_dir=Path(arguments.tensorboard) if arguments.tensorboard else None,
        )
    except (RuntimeError, ValueError, DataError) as error:
        print(f"fmnist tune-worker: error: {error}", file=sys.stderr)
        return 2


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The serving load's shape, shared by ``bench`` and ``loadtest``."""
    positive = bounded_int(1, 10_000, "clients")
    parser.add_argument("--clients", type=positive, default=32, help="paced HTTP clients (default: %(default)s)")
    parser.add_argument(
        "--rate", type=float, default=5.0, help="requests per second per paced client (default: %(default)s)"
    )
    parser.add_argument(
        "--closed-clients", type=positive, default=64, help="clients sending back to back (default: %(default)s)"
    )
    parser.add_argument(
        "--slow-clients", type=positive, default=500, help="clients trickling their headers (default: %(default)s)"
    )
    parser.add_argument(
        "--seconds", type=float, default=20.0, help="duration of each load phase (default: %(default)s)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fmnist", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser(
        "run",
        help="run the study's notebooks in order with papermill and render the HTML report",
        description="Run the study's notebooks in order with papermill into a work directory beside OUT, then "
        "publish them whole into OUT with the HTML report. Stages whose inputs are unchanged are kept; an "
        "interrupted run resumes. Example: fmnist run --params params/smoke --out build/smoke",
    )
    run.add_argument("--params", default=str(PARAMS_DIR), help="params profile directory (default: %(default)s)")
    run.add_argument("--out", default=str(REPORTS_DIR), help="where artifacts and the report go (default: %(default)s)")
    run.add_argument(
        "--stage",
        action="append",
        choices=ALL_STAGES,
        help="run only this stage (repeatable); default: 01_eda to 05_deploy, then the report "
        "(06_experiments, hours of training, runs when named, and is kept current once OUT holds it)",
    )
    shown = run.add_mutually_exclusive_group()
    shown.add_argument(
        "--verbose",
        action="store_true",
        help="show the notebooks' whole output live (by default: progress lines; all of it is in OUT/logs/)",
    )
    shown.add_argument("--quiet", action="store_true", help="show only one line per stage")
    run.add_argument(
        "--fresh",
        action="store_true",
        help="recompute every stage from scratch (default: keep current stages, resume an interrupted run)",
    )
    run.set_defaults(handler=_run)
    check = commands.add_parser(
        "data",
        help="find and verify the four Fashion-MNIST files (checksums included)",
        description="Look for the IDX files ($FMNIST_DATA_DIR, Debian's dataset-fashion-mnist, ~/.keras/datasets), "
        "download them unless --offline, and verify their checksums. Example: fmnist data --offline",
    )
    check.add_argument("--offline", action="store_true", help="do not try the official download")
    check.set_defaults(handler=_data)

    classify = commands.add_parser(
        "classify",
        help="classify image files with the LiteRT model (no TensorFlow)",
        description="Classify image files with the LiteRT model; needs only `pip install 'fmnist[serve]'`. "
        "Example: fmnist classify shirt.jpg boot.png --top-k 2",
        epilog=CLASSIFY_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, WebP, BMP or GIF files")
    classify.add_argument(
        "--top-k",
        type=bounded_int(1, 10, "classes per image"),
        default=3,
        help="classes to show per image, 1 to 10 (default: %(default)s)",
    )
    classify.add_argument("--json", action="store_true", help="one JSON object per line")
    classify.add_argument("--model", help="a .tflite model (default: the one shipped with fmnist)")
    classify.set_defaults(handler=_classify)

    server = commands.add_parser(
        "serve",
        help="serve the web page and the JSON API (POST /predict, GET /healthz, /docs)",
        description="Serve the page and the JSON API on uvicorn. Example: fmnist serve --port 8000, then open "
        "http://127.0.0.1:8000/ (the API is described at /docs).",
        epilog=SERVE_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    server.add_argument(
        "--host", default="127.0.0.1", help="address to bind; 0.0.0.0 opens it to the network (default: %(default)s)"
    )
    server.add_argument("--port", type=bounded_int(0, 65535, "port"), default=8000, help="port (default: %(default)s)")
    server.add_argument("--model", help="a .tflite model (default: the one shipped with fmnist)")
    server.add_argument("--certfile", help="TLS certificate (PEM): serve HTTPS; needs --keyfile")
    server.add_argument("--keyfile", help="TLS private key (PEM) for --certfile")
    server.add_argument(
        "--max-connections",
        type=bounded_int(1, 100_000, "open connections"),
        default=1024,
        help="open connections before new ones get a 503 (default: %(default)s)",
    )
    server.add_argument("--verbose", action="store_true", help="log every request, and tracebacks of failures")
    server.set_defaults(handler=_serve)

    benchmark = commands.add_parser(
        "bench",
        help="measure size, latency, throughput and serving; write a JSON",
        description="Measure a study run's models (Keras and LiteRT, one thread each), then load and abuse a "
        "fresh `fmnist serve` (see `fmnist loadtest`). Example: fmnist bench --out reports",
    )
    benchmark.add_argument("--out", default=str(REPORTS_DIR), help="the study run to measure (default: %(default)s)")
    benchmark.add_argument("--json", help="where to write the figures (default: OUT/deploy/bench.json)")
    benchmark.add_argument(
        "--runs",
        type=bounded_int(1, 10_000_000, "--runs"),
        default=2000,
        help="timed single-image runs (default: %(default)s)",
    )
    add_load_arguments(benchmark)
    benchmark.add_argument(
        "--serve-model",
        choices=("float32", "int8", "shipped"),
        default="int8",
        help="the LiteRT model the serving figures use: the study's float32 or int8 export, or the classifier "
        "05_deploy shipped (deploy/shipped_int8.tflite) (default: %(default)s)",
    )
    benchmark.set_defaults(handler=_bench)

    index = commands.add_parser(
        "runs",
        help="list the published runs with their commit, machine, test accuracy and loss",
        description="Find every published run (a directory with the runner's manifest.json) below the roots and "
        "print one row each, newest first: run id, params profile, git commit (-dirty: uncommitted changes), "
        "machine (CPU model, cores, widest vector unit), test accuracy and loss (metrics.json), and study time "
        "(01_eda to 05_deploy added up, stages kept from earlier runs included). Unknown fields show as -. "
        "Example: fmnist runs --root reports --root build --csv build/runs.csv",
    )
    index.add_argument(
        "--root",
        action="append",
        metavar="DIR",
        help="where to look, searched recursively (repeatable; default: the project's reports/ and build/)",
    )
    index.add_argument("--csv", metavar="PATH", help="also write the rows to this CSV file (e.g. runs.csv)")
    index.set_defaults(handler=_runs)

    worker = commands.add_parser(
        "tune-worker",
        help="join a distributed 02_tune search as a keras-tuner worker",
        description="Ask the chief (`fmnist run` with `workers: N` in params/02_tune.yaml) for trials and train "
        "them until the search is done. The machine needs the Fashion-MNIST files and the chief's commit of "
        "fmnist; the worker checks both before it trains. Example: fmnist tune-worker --oracle 10.0.0.5:41234",
    )
    worker.add_argument("--oracle", required=True, help="the chief's HOST:PORT, as its log prints it")
    worker.add_argument("--id", default=f"worker-{socket.gethostname()}-{os.getpid()}", help="this worker's name")
    worker.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="TensorFlow threads (default: all)")
    worker.add_argument(
        "--directory",
        default="build/tune-worker",
        help="where trial checkpoints go (default: %(default)s; Hyperband needs the chief's, on a shared disk)",
    )
    worker.add_argument("--data-dir", help="the Fashion-MNIST files (default: the usual places, see `fmnist data`)")
    worker.add_argument(
        "--tensorboard",
        metavar="DIR",
        help="write each trial's TensorBoard log below DIR (default: none; the chief's log prints its directory, "
        "which a worker on a shared disk can use so that its trials show with the others)",
    )
    worker.set_defaults(handler=_tune_worker)

    load = commands.add_parser(
        "loadtest",
        help="load and abuse a fresh `fmnist serve` process; print and record the figures",
        description="Start `fmnist serve` on loopback, then: one idle client; hostile uploads from 8 clients at "
        "once; paced clients; clients back to back; slow clients trickling headers while /healthz is polled. "
        "Needs no TensorFlow. Example: fmnist loadtest --json build/loadtest.json",
    )
    load.add_argument("--model", help="a .tflite model (default: the one shipped with fmnist)")
    load.add_argument("--json", help="also write the figures to this file")
    add_load_arguments(load)
    load.set_defaults(handler=_loadtest)

    verify = commands.add_parser(
        "verify-run",
        help="retrain one stored experiment run with this code and compare it with what it recorded",
        description="Retrain a stored 06_experiments run (its recipe, seed and split as recorded) in a temporary "
        "directory and compare its history, validation and test figures with the stored ones; exit 0 when all "
        "are identical, 1 when any differs. The stored run is only read. Example: fmnist verify-run bn_cnn_deep 42",
    )
    verify.add_argument("recipe", help="a recipe name under OUT/experiments/runs/")
    verify.add_argument("seed", type=int, help="its seed")
    verify.add_argument("--out", default=str(REPORTS_DIR), help="the study run holding it (default: %(default)s)")
    verify.add_argument("--json", help="also write the comparison to this file")
    verify.add_argument(
        "--validation-size",
        type=int,
        default=6000,
        help="for a run that does not record its split: its validation images (default: %(default)s, the study's)",
    )
    verify.add_argument(
        "--train-subset",
        type=int,
        default=0,
        help="for a run that does not record its split: its training subset (default: %(default)s, all)",
    )
    verify.add_argument(
        "--restore",
        action="store_true",
        help="when it reproduces exactly and its model is not on disk, keep the retrained model there (a fresh "
        "clone's teacher, say, without retraining its run or its students)",
    )
    verify.add_argument("--verbose", action="store_true", help="show the training's epochs")
    verify.set_defaults(handler=_verify_run)

    latency = commands.add_parser(
        "latency",
        help="single-image LiteRT latency and size of .tflite models",
        description="Time one-image LiteRT inference on one thread. Example: fmnist latency reports/deploy/*.tflite",
    )
    latency.add_argument("models", nargs="+", metavar="MODEL", help=".tflite files")
    latency.add_argument(
        "--runs",
        type=bounded_int(1, 10_000_000, "--runs"),
        default=1000,
        help="timed runs per model (default: %(default)s)",
    )
    latency.add_argument("--json", help="also write the figures to this file")
    latency.set_defaults(handler=_latency)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    arguments = parser.parse_args(argv)
    if arguments.command == "serve" and bool(arguments.certfile) != bool(arguments.keyfile):
        parser.error("--certfile and --keyfile go together: give both to serve HTTPS.")
    return arguments.handler(arguments)


if __name__ == "__main__":
    raise SystemExit(main())
