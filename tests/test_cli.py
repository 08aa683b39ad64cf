"""The fmnist command's options and exit codes, as a user at a terminal meets them."""

from __future__ import annotations

import pytest
from PIL import Image

from fmnist import __version__
from fmnist.cli import main

from pictures import trouser


@pytest.fixture
def trousers(tmp_path):
    path = tmp_path / "trousers.png"
    Image.fromarray(trouser()).save(path)
    return path


def test_version(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--version"])
    assert exited.value.code == 0 and capsys.readouterr().out.strip() == f"fmnist {__version__}"


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["classify", "x.png", "--top-k", "0"], "0 is out of range (classes per image: 1 to 10)"),
        (["classify", "x.png", "--top-k", "11"], "11 is out of range"),
        (["classify", "x.png", "--top-k", "-1"], "-1 is out of range"),
        (["classify", "x.png", "--top-k", "two"], "'two' is not a whole number"),
        (["serve", "--port", "99999"], "99999 is out of range (port: 0 to 65535)"),
        (["serve", "--port", "-5"], "-5 is out of range"),
        (["serve", "--certfile", "cert.pem"], "--certfile and --keyfile go together"),
        (["loadtest", "--closed-clients", "0"], "0 is out of range"),
        (["latency", "model.tflite", "--runs", "0"], "0 is out of range (--runs: 1 to"),
        (["bench", "--runs", "-3"], "-3 is out of range (--runs: 1 to"),
    ],
)
def test_bad_options_are_usage_errors_not_tracebacks(arguments, message, capsys):
    with pytest.raises(SystemExit) as exited:
        main(arguments)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert "usage:" in error and message in error and "Traceback" not in error


def test_every_file_gets_one_line_and_the_rest_are_still_classified(trousers, tmp_path, capsys):
    directory = tmp_path / "a_directory"
    directory.mkdir()
    missing = tmp_path / "missing.jpg"
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    assert main(["classify", str(directory), str(missing), str(text), str(trousers)]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 3 and "Traceback" not in captured.err
    assert errors[0].startswith(f"{directory}: error: ") and errors[1].startswith(f"{missing}: error: ")
    assert errors[2].startswith(f"{text}: error: not an image")
    assert captured.out.startswith(f"{trousers}: Trouser ")
    assert main(["classify", str(trousers)]) == 0


def test_a_bad_model_is_exit_code_2(trousers, tmp_path, capsys):
    assert main(["classify", str(trousers), "--model", str(tmp_path / "nope.tflite")]) == 2
    assert "model file not found" in capsys.readouterr().err


def test_serve_refuses_a_port_in_use_with_a_message(capsys):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--port", str(taken.getsockname()[1])]) == 2
    error = capsys.readouterr().err
    assert "cannot listen on 127.0.0.1" in error and "choose another --port" in error


def test_bench_of_the_shipped_classifier_needs_it_shipped_first(tmp_path, capsys):
    from fmnist.config import ArtifactLayout

    layout = ArtifactLayout(tmp_path)
    for path in (layout.model, layout.litert_model("float32"), layout.litert_model("int8")):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"a study's file")
    assert main(["bench", "--out", str(tmp_path), "--serve-model", "shipped"]) == 2
    error = capsys.readouterr().err
    assert str(layout.shipped_model) in error and "05_deploy" in error


def test_verify_run_names_a_run_that_is_not_there(tmp_path, capsys):
    assert main(["verify-run", "no_such_recipe", "42", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "no stored run" in error and "no_such_recipe" in error


def test_verify_run_refuses_while_an_unfinished_run_would_replace_its_check(tmp_path, capsys):
    from fmnist import runs

    out = tmp_path / "reports"
    out.mkdir()
    work = runs.work_dir_for(out)
    work.mkdir()
    (work / runs.RUN_FILE).write_text("{}")
    assert main(["verify-run", "bn_cnn_deep", "42", "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert "unfinished `fmnist run`" in error and str(work) in error
    assert not (out / "experiments").exists()
