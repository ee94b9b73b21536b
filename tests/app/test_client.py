"""app.client against a real server: predict, predict_many, evaluate (with the offline
comparison), and the command line's errors."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image

import app.client as client_module
from app.client import APIError, Client, TransferFailed, UnreadableFile, evaluate, main
from tests.app.images import jpeg
from tests.app.support import CLASSES, MAX_UPLOAD, Server, free_port
from tests.helpers import (
    LONG_CLASS_NAMES,
    SHORT_CLASS_NAMES,
    assert_one_line_error,
    assert_per_class_column,
    run_cli,
    run_cli_into_a_closed_pipe,
)
from training.artifact import load_for_inference
from training.data import load_test_split
from training.engine import evaluate_model
from training.errors import UserError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def test_tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """DIR/test/<class>/*.jpg with the served model's 10 classes, 2 images each."""
    root = tmp_path_factory.mktemp("client-data")
    for i, name in enumerate(CLASSES):
        for j in range(2):
            path = root / "test" / name / f"{j}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(jpeg(seed=10 * i + j))
    return root


def test_predict_and_predict_many(server: Server, tmp_path: Path) -> None:
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(seed=1))
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    client = Client(server.url)
    one = client.predict(good, top_k=3)
    assert one["label"] in CLASSES and len(one["top_k"]) == 3
    results = client.predict_many([good, bad, good])
    assert results[0] == results[2] == client.predict(good)
    assert isinstance(results[1], APIError) and results[1].status == 415
    assert results[1].code == "not_an_image"


def test_evaluate_matches_the_offline_evaluation(
    server: Server, artifact: Path, test_tree: Path, tmp_path: Path
) -> None:
    split, classes, names = load_test_split(test_tree, tmp_path)
    _, offline = evaluate_model(
        load_for_inference(artifact), split, classes, device=torch.device("cpu")
    )
    offline_file = tmp_path / "offline.json"
    offline_file.write_text(json.dumps(dict(zip(names, offline.tolist(), strict=True))))
    report = evaluate(Client(server.url), test_tree, concurrency=4, compare=offline_file)
    assert report["images"] == 20 and report["errors"] == 0
    expected = (
        sum(int(p) == int(label) for p, label in zip(offline, split.labels, strict=True)) / 20 * 100
    )
    assert report["accuracy"] == pytest.approx(expected)
    assert report["compared"] == 20 and report["disagreements"] == 0
    assert set(report["per_class"]) == set(CLASSES)


def test_cli_predict_prints_json_lines(server: Server, tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(seed=2))
    result = run_cli("-m", "app.client", "predict", image, "--url", server.url, "--top-k", "2")
    assert result.returncode == 0, result.stderr
    line = json.loads(result.stdout)
    assert line["file"] == str(image) and len(line["top_k"]) == 2


def test_cli_without_a_server_is_one_line(tmp_path: Path) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(seed=2))
    result = run_cli(
        "-m", "app.client", "predict", image, "--url", f"http://127.0.0.1:{free_port()}"
    )
    assert_one_line_error(result, "cannot reach")


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_uploads_that_get_no_answer_do_not_say_the_server_is_unreachable(
    test_tree: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: str,
) -> None:
    """The server took every upload (for `evaluate`, it even answered /model) and answered
    none: 'cannot reach ...; is the server running?' sent the user looking in the wrong place."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model":
            return httpx.Response(200, json={"classes": CLASSES})
        raise httpx.ReadTimeout("", request=request)  # httpx's own: no message

    monkeypatch.setattr(
        client_module,
        "Client",
        lambda url, key: Client(url, key, transport=httpx.MockTransport(handler)),
    )
    url = "http://127.0.0.1:9"
    if command == "predict":
        args = ["predict", str(next(test_tree.glob("test/*/*.jpg")))]
    else:
        args = ["evaluate", "--data-dir", str(test_tree)]
    assert main([*args, "--url", url]) == 2
    assert capsys.readouterr().err.splitlines() == [
        f"error: no answer from {url} (ReadTimeout); the server took the requests but answered "
        "none: see its log (overloaded, or stopped?)"
    ]


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--url", "http://[::1:8811"], "--url http://[::1:8811 is not a valid URL"),
        (["--url", "http://127.0.0.1:99999"], "--url http://127.0.0.1:99999: the port must be"),
        (["--api-key", "ключ"], "--api-key: use ASCII characters only"),
    ],
)
def test_a_url_or_key_httpx_cannot_send_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    """httpx raised them as tracebacks (InvalidURL, an OverflowError in an ExceptionGroup, a
    UnicodeEncodeError), after the files were read."""
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(seed=2))
    assert main(["predict", str(image), *flags]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {message}"), line


def test_answers_that_are_not_this_services_are_errors_not_predictions(
    test_tree: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong port or a proxy's page answering 200 with HTML: predict printed an "error" line
    and exited 0, evaluate ended in a KeyError traceback."""
    pages: dict[str, httpx.Response] = {}

    def handler(request: httpx.Request) -> httpx.Response:
        return pages.get(request.url.path, httpx.Response(200, html="<h1>Sign in</h1>"))

    monkeypatch.setattr(
        client_module,
        "Client",
        lambda url, key: Client(url, key, transport=httpx.MockTransport(handler)),
    )
    image = str(next(test_tree.glob("test/*/*.jpg")))
    assert main(["predict", image]) == 1
    line = json.loads(capsys.readouterr().out)
    assert "bad_response: not an answer of this service (is the URL right?)" in line["error"]
    assert main(["evaluate", "--data-dir", str(test_tree)]) == 2
    assert "bad_response: not an answer of this service" in capsys.readouterr().err
    pages["/model"] = httpx.Response(200, json={"classes": CLASSES})  # only /predict is wrong
    assert main(["evaluate", "--data-dir", str(test_tree)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith("20 images over HTTP: 0.00% top-1, 20 errors")
    assert "Traceback" not in captured.err


def test_the_api_key_is_sent_and_busy_answers_are_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """predict_many sends X-API-Key and, on 503, waits Retry-After and tries again."""
    seen: list[tuple[str, str | None]] = []
    answers = iter([(503, {"error": "busy", "detail": "queue full"}), (200, {"class_id": 1})])

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((request.url.path, request.headers.get("X-API-Key")))
        status, body = next(answers)
        return httpx.Response(status, json=body, headers={"Retry-After": "0.01"})

    image = tmp_path / "a.jpg"
    image.write_bytes(jpeg(0))
    client = Client("http://test", api_key="k3y", transport=httpx.MockTransport(handler))
    assert client.predict_many([image]) == [{"class_id": 1}]
    assert seen == [("/predict", "k3y"), ("/predict", "k3y")]


def test_classes_in_another_order_are_refused_not_miscounted(
    artifact: Path, test_tree: Path, tmp_path: Path
) -> None:
    """Scores would be silently wrong if class ids meant other classes on the two sides."""
    split, classes, _ = load_test_split(test_tree, tmp_path)
    with pytest.raises(
        UserError, match="are not the model's: the same 10 classes in another order"
    ):
        evaluate_model(
            load_for_inference(artifact), split, classes[::-1], device=torch.device("cpu")
        )

    def handler(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/model"  # refused before any image is sent
        return httpx.Response(200, json={"classes": classes[::-1]})

    client = Client("http://test", transport=httpx.MockTransport(handler))
    with pytest.raises(UserError, match="are not the data's: the same 10 classes in another order"):
        evaluate(client, test_tree)


def test_cli_predict_reports_each_unreadable_path_and_predicts_the_others(
    server: Server, tmp_path: Path
) -> None:
    """A missing file or a folder among the arguments gets its own "error" line, as a file the
    server refuses does; the readable files are still predicted, in argument order."""
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(seed=3))
    missing = tmp_path / "missing.jpg"
    folder = tmp_path / "photos"
    folder.mkdir()
    result = run_cli(
        "-m", "app.client", "predict", good, missing, folder, good, "--url", server.url
    )
    assert "Traceback" not in result.stderr, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in (good, missing, folder, good)]
    assert lines[0]["label"] in CLASSES and lines[3] == lines[0]
    assert lines[1]["error"] == f"cannot read {missing}: No such file or directory"
    assert lines[2]["error"] == f"cannot read {folder}: it is a folder; pass the image files in it"
    assert result.returncode == 1
    assert result.stderr.strip() == '2 of 4 files got no prediction (their lines have an "error")'

    results = Client(server.url).predict_many([missing, good])  # the same from Python
    assert isinstance(results[0], UnreadableFile) and results[0].path == missing
    assert {"file": str(good), **results[1]} == lines[0]


def test_cli_predict_reports_a_file_over_the_upload_limit_and_predicts_the_others(
    server: Server, tmp_path: Path
) -> None:
    """The server refuses an oversized file from its Content-Length while the client still
    sends it; the client used to see a reset connection, say the server could not be reached,
    and drop every prediction."""
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(seed=5))
    big = tmp_path / "big.jpg"
    big.write_bytes(b"\0" * (40 * MAX_UPLOAD))  # 8 MB: still sending when refused
    result = run_cli("-m", "app.client", "predict", good, big, good, "--url", server.url)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["file"] for line in lines] == [str(p) for p in (good, big, good)]
    assert lines[0]["label"] in CLASSES and lines[2] == lines[0]
    assert lines[1]["error"].startswith("HTTP 413 too_large: "), lines[1]


def test_a_file_without_an_answer_fails_alone(tmp_path: Path) -> None:
    """A transfer that fails (reset, timeout) is that file's error; only when no file got an
    answer is it the server that cannot be reached (the CLI's exit 2)."""
    lost_too = False

    def handler(request: httpx.Request) -> httpx.Response:
        if lost_too or b'filename="lost.jpg"' in request.read():
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, json={"class_id": 1})

    paths = [tmp_path / name for name in ("a.jpg", "lost.jpg", "c.jpg")]
    for path in paths:
        path.write_bytes(jpeg(0))
    client = Client("http://test", transport=httpx.MockTransport(handler))
    results = client.predict_many(paths)
    assert results[0] == results[2] == {"class_id": 1}
    assert isinstance(results[1], TransferFailed) and results[1].path == paths[1]
    assert str(results[1]) == f"no answer for {paths[1]}: connection reset"
    lost_too = True
    with pytest.raises(httpx.ReadError):
        client.predict_many(paths)


def test_cli_predict_exits_1_when_the_server_refuses_a_file(server: Server, tmp_path: Path) -> None:
    """Scripts can tell: the exit status is 0 only when every file got a prediction (see
    test_cli_predict_prints_json_lines), 1 when the server refused one; --help says so."""
    good = tmp_path / "a.jpg"
    good.write_bytes(jpeg(seed=4))
    notes = tmp_path / "notes.txt"
    notes.write_text("not an image")
    result = run_cli("-m", "app.client", "predict", good, notes, "--url", server.url)
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert "top_k" in lines[0] and lines[1]["error"].startswith("HTTP 415 not_an_image")
    usage = run_cli("-m", "app.client", "predict", "--help")
    assert usage.returncode == 0 and "1 when some file did not" in " ".join(usage.stdout.split())


@pytest.mark.parametrize(
    ("option", "content", "message"),
    [
        pytest.param(
            "--concurrency", "0", "--concurrency must be at least 1, not 0", id="concurrency-0"
        ),
        pytest.param(
            "--concurrency",
            "-3",
            "--concurrency must be at least 1, not -3",
            id="concurrency-negative",
        ),
        pytest.param(
            "--compare", "notes, not JSON", "is not JSON (Expecting value", id="compare-text"
        ),
        pytest.param(
            "--compare",
            b"\xff\xfe binary",
            "is not JSON ('utf-8' codec can't decode",
            id="compare-binary",
        ),
        pytest.param("--compare", None, "cannot read --compare", id="compare-missing"),
        pytest.param(
            "--compare", [0, 1], "holds a list; expected {image name: class id}", id="compare-list"
        ),
        pytest.param(
            "--compare",
            {"test/cat/0.jpg": "cat"},
            "maps 'test/cat/0.jpg' to \"cat\", not a class",
            id="compare-labels",
        ),
        pytest.param(
            "--compare",
            {"test/3": 1},
            "names none of the 20 test images (its names look like",
            id="compare-other-data",
        ),
        pytest.param(
            "--compare",
            {"test/cat/1.jpg": 10},
            "gives 'test/cat/1.jpg' class id 10, but the data has 10",
            id="compare-id-out-of-range",
        ),
        pytest.param(
            "--json-out",
            "no-such-folder/report.json",
            "must be a file path in an existing folder",
            id="json-out-no-folder",
        ),
        pytest.param(
            "--json-out", ".", "must be a file path in an existing folder", id="json-out-a-folder"
        ),
    ],
)
def test_cli_evaluate_checks_its_options_before_contacting_the_server(
    test_tree: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    option: str,
    content: object,
    message: str,
) -> None:
    """Each bad option is one `error:` line (exit 2) before anything is sent: no server listens
    at the URL, so a check made after the first request would say 'cannot reach' instead, and a
    check made after the uploads would lose the whole evaluation."""
    value = content
    if option == "--compare":
        value = tmp_path / "offline.json"
        if isinstance(content, bytes):
            value.write_bytes(content)
        elif isinstance(content, str):
            value.write_text(content)
        elif content is not None:
            value.write_text(json.dumps(content))
    elif option == "--json-out":
        value = tmp_path / str(content)
    url = f"http://127.0.0.1:{free_port()}"
    args = ["evaluate", "--url", url, "--data-dir", str(test_tree), option, str(value)]
    assert main(args) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_evaluate_writes_its_json_report(
    server: Server, test_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    offline = tmp_path / "offline.json"
    names = [p.relative_to(test_tree).as_posix() for p in test_tree.rglob("*.jpg")]
    offline.write_text(json.dumps(dict.fromkeys(names, 0)))
    out = tmp_path / "report.json"
    args = ["evaluate", "--url", server.url, "--data-dir", str(test_tree), "--concurrency", "3"]
    assert main([*args, "--compare", str(offline), "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["images"] == 20 and report["compared"] == 20 and report["concurrency"] == 3
    assert capsys.readouterr().out.startswith("20 images over HTTP: ")


def test_cli_into_a_closed_pipe_ends_quietly_with_its_report_written(
    server: Server, test_tree: Path, tmp_path: Path
) -> None:
    """`predict ... | head -1` printed a BrokenPipeError traceback; so did `evaluate`, before
    writing --json-out. Both now run to their end, their output dropped, with the status that
    says how it went."""
    images = [tmp_path / f"{k}.jpg" for k in range(2)] + [tmp_path / "notes.txt"]
    for k, image in enumerate(images):
        image.write_bytes(jpeg(seed=k) if image.suffix == ".jpg" else b"not an image")
    result = run_cli_into_a_closed_pipe("-m", "app.client", "predict", *images, "--url", server.url)
    assert result.returncode == 1, result.stderr  # one file got no prediction
    assert result.stderr == '1 of 3 files got no prediction (their lines have an "error")\n'
    out = tmp_path / "report.json"
    result = run_cli_into_a_closed_pipe(
        "-m", "app.client", "evaluate", "--url", server.url, "--data-dir", test_tree,
        "--json-out", out, PYTHONUNBUFFERED="1",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert json.loads(out.read_text())["images"] == 20


def test_cli_evaluate_prints_its_report_when_the_json_report_cannot_be_written(
    server: Server,
    test_tree: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """When writing the JSON report fails (a full disk), the printed report is the only
    copy: it is printed all the same, then the error."""

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "report.json"
    args = ["evaluate", "--url", server.url, "--data-dir", str(test_tree), "--json-out", str(out)]
    assert main(args) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("20 images over HTTP: ")
    assert captured.err.strip() == f"error: cannot write {out}: No space left on device"


@pytest.mark.parametrize("concurrency", [0, -1])
def test_predict_many_refuses_a_concurrency_below_1(concurrency: int) -> None:
    """A semaphore of 0 would wait forever (no paths here, so a missing check cannot hang)."""
    client = Client("http://test", transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    with pytest.raises(ValueError, match="concurrency must be at least 1"):
        client.predict_many([], concurrency=concurrency)


@pytest.mark.parametrize("value", ["0", "11", "five"])
def test_cli_predict_checks_top_k_before_sending_anything(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], value: str
) -> None:
    """No server listens at the URL: a --top-k refused only by the server would read 'cannot
    reach' here (and with a server, one refusal per file)."""
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(seed=2))
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(SystemExit) as exited:
        main(["predict", str(image), "--url", url, "--top-k", value])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert f"--top-k: must be an integer from 1 to 10, not '{value}'" in err


def test_cli_says_a_url_without_its_scheme_is_the_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "x.jpg"
    image.write_bytes(jpeg(seed=2))
    assert main(["predict", str(image), "--url", "localhost:8000"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --url localhost:8000 must start with http:// or https://"]


def test_cli_evaluate_with_refused_images_exits_1_and_does_not_count_them_as_agreeing(
    server: Server, test_tree: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Training reads any format PIL reads, the server five: a TIFF test image is refused. The
    run exited 0, and the agreement line did not say that images went uncompared."""
    tree = tmp_path / "data"
    shutil.copytree(test_tree, tree)
    tiff = tree / "test" / CLASSES[0] / "scan.tif"
    Image.open(io.BytesIO(jpeg(seed=5))).save(tiff)
    names = [p.relative_to(tree).as_posix() for p in (tree / "test").rglob("*.*")]
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps(dict.fromkeys(names, 0)))
    args = ["evaluate", "--url", server.url, "--data-dir", str(tree), "--compare", str(offline)]
    assert main(args) == 1
    captured = capsys.readouterr()
    assert "21 images over HTTP: " in captured.out and ", 1 errors," in captured.out
    assert "of 20 images differ; 1 not compared: refused, or unreadable here)" in captured.out
    assert captured.err.splitlines() == [
        f"1 of 21 images got no prediction, e.g. test/{CLASSES[0]}/scan.tif: HTTP 415 "
        "unsupported_format: TIFF images are not accepted; send JPEG, PNG, WebP, BMP or GIF"
    ]


def test_evaluate_when_every_image_is_refused_reports_no_agreement(
    test_tree: Path, tmp_path: Path
) -> None:
    """0 of 0 images differing is not 100% agreement."""
    names = [p.relative_to(test_tree).as_posix() for p in test_tree.rglob("*.jpg")]
    offline = tmp_path / "offline.json"
    offline.write_text(json.dumps(dict.fromkeys(names, 0)))

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/model":
            return httpx.Response(200, json={"classes": CLASSES})
        return httpx.Response(415, json={"error": "not_an_image", "detail": "no"})

    client = Client("http://test", transport=httpx.MockTransport(handler))
    report = evaluate(client, test_tree, compare=offline)
    assert report["errors"] == report["not_compared"] == 20
    assert report["compared"] == 0 and report["agreement"] is None


@pytest.mark.parametrize("per_class", [LONG_CLASS_NAMES, SHORT_CLASS_NAMES], ids=["long", "short"])
def test_cli_evaluate_prints_the_per_class_accuracies_in_one_column(
    per_class: dict[str, float],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Class names longer than 12 characters pushed their percentage out of the column."""
    report = {
        "images": 6, "accuracy": 50.0, "errors": 0, "requests_per_s": 1.0, "concurrency": 1,
        "per_class": per_class,
    }  # fmt: skip
    monkeypatch.setattr(client_module, "evaluate", lambda *a: report)
    assert main(["evaluate", "--data-dir", str(tmp_path)]) == 0
    assert_per_class_column(capsys.readouterr().out, per_class)
