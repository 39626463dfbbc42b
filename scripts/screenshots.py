"""The documentation's pictures of the MLflow UI, taken from a real store: `make screenshots`.

Makes a fresh store (outputs/screenshots/mlruns) holding a real DNN run and a real CNN run
(the main job, `mlflow run .`, on the real data), a comparison and a registered champion;
starts `mlflow ui` over it on a free port; photographs its pages with Debian's headless
Chromium, driven over the DevTools protocol (aiohttp, an MLflow dependency, speaks it) so
each shot waits until the page shows what it is meant to show; stops the UI; and checks
that no picture is blank. The PNGs go to docs/.

    python scripts/screenshots.py [--cnn-epochs 5] [--reuse]

Takes a few minutes of CPU: the CNN's 5 epochs are most of it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
EXPERIMENT = "fashion-mnist"
WIDTH, HEIGHT = 1600, 1000
PAGE_TIMEOUT_S = 90
# Before the app starts: keep MLflow's assistant panel, which opens itself on a first visit, closed.
BROWSER_SETUP = (
    "localStorage.setItem('mlflow.assistant.fab.autoOpenedOnFirstLoad_v1', 'true');"
    "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false');"
)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def sh(*args: str, env: dict[str, str]) -> str:
    log("$ " + " ".join(args))
    done = subprocess.run(args, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    sys.stderr.write(done.stdout[-2000:])
    if done.returncode:
        raise SystemExit(f"screenshots: `{' '.join(args)}` failed with exit code {done.returncode}")
    return done.stdout


# ----------------------------------------------------------------------------- the store


def make_store(store: Path, env: dict[str, str], cnn_epochs: int) -> None:
    """A DNN run and a CNN run of the main job, compared, registered, the CNN promoted."""
    if store.exists():
        shutil.rmtree(store)
    store.mkdir(parents=True)
    # Created first so the artifacts go beside the database, not into ./mlruns of the cwd.
    sh(str(BIN / "python"), "-c", f"from pipeline import tracking; tracking.configure({EXPERIMENT!r})", env=env)
    mlflow_run = [str(BIN / "mlflow"), "run", ".", "--env-manager", "local", "--experiment-name", EXPERIMENT]
    sh(*mlflow_run, "-P", "model=dnn", "-P", "register=true", env=env)
    sh(*mlflow_run, "-P", "model=cnn", "-P", f"epochs={cnn_epochs}", "-P", "register=true", env=env)
    sh(str(BIN / "pipeline"), "compare", "--output-dir", str(store.parent / "compare"), env=env)
    sh(str(BIN / "pipeline"), "promote", "--name", "fashion-cnn", env=env)


def find_runs(env: dict[str, str]) -> tuple[str, str, str]:
    """The experiment id, the CNN run id and the id of its ONNX LoggedModel."""
    os.environ.update(env)
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    runs = mlflow.search_runs(
        [experiment.experiment_id],
        filter_string="params.model = 'cnn' AND attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    if runs.empty:
        raise SystemExit("screenshots: the store holds no finished CNN run; run without --reuse")
    onnx_model = str(runs.iloc[0]["tags.onnx_model_uri"]).removeprefix("models:/")
    return experiment.experiment_id, str(runs.iloc[0]["run_id"]), onnx_model


# ----------------------------------------------------------------------------- the UI


def start_ui(store: Path, port: int) -> subprocess.Popen:
    log_file = open(store.parent / "ui.log", "wb")  # noqa: SIM115 - lives as long as the server
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{store / 'mlflow.db'}"]
        + ["--host", "127.0.0.1", "--port", str(port)],
        cwd=store.parent,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # mlflow ui starts uvicorn workers: stop the whole group
        env={**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"},
    )
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"screenshots: mlflow ui exited; see {store.parent / 'ui.log'}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as answer:
                if answer.status == 200:
                    return server
        except OSError:
            time.sleep(0.5)
    stop(server)
    raise SystemExit("screenshots: mlflow ui did not answer in 180 s")


def stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=20)


# ----------------------------------------------------------------------------- the browser


class Chromium:
    """Headless Chromium over the DevTools protocol: navigate, wait for text, capture."""

    def __init__(self) -> None:
        self.profile = Path(tempfile.mkdtemp(prefix="screenshots-chromium-"))
        args = [shutil.which("chromium") or "chromium", "--headless=new", "--disable-gpu", "--hide-scrollbars"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium's sandbox refuses to run as root
        args += [
            "--remote-debugging-port=0",
            f"--user-data-dir={self.profile}",
            f"--window-size={WIDTH},{HEIGHT}",
            "about:blank",
        ]
        self.process = subprocess.Popen(
            args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self.next_id = 0

    async def __aenter__(self) -> Chromium:
        import aiohttp

        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("screenshots: chromium did not start (is Debian's chromium installed?)")
            await asyncio.sleep(0.2)
        port = port_file.read_text().split()[0]
        self.session = aiohttp.ClientSession()
        async with self.session.get(f"http://127.0.0.1:{port}/json/list") as answer:
            pages = [t for t in await answer.json() if t["type"] == "page"]
        self.ws = await self.session.ws_connect(pages[0]["webSocketDebuggerUrl"], max_msg_size=0)
        await self.send("Page.enable")
        await self.send("Page.addScriptToEvaluateOnNewDocument", source=BROWSER_SETUP)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.ws.close()
        await self.session.close()
        stop(self.process)
        shutil.rmtree(self.profile, ignore_errors=True)

    async def send(self, method: str, **params):
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        while True:
            message = json.loads((await self.ws.receive()).data)
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def shoot(self, url: str, wait_for: list[str], path: Path, width: int = WIDTH) -> None:
        """Load `url`, wait until the page shows every text of `wait_for` and settles, save a PNG."""
        metrics = {"width": width, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False}
        await self.send("Emulation.setDeviceMetricsOverride", **metrics)
        await self.send("Page.navigate", url="about:blank")
        await self.send("Page.navigate", url=url)
        shown = " && ".join(f"t.includes({json.dumps(text)})" for text in wait_for)
        check = f"(() => {{ const t = document.body ? document.body.innerText : ''; return {shown}; }})()"
        deadline = time.monotonic() + PAGE_TIMEOUT_S
        while True:
            found = await self.send("Runtime.evaluate", expression=check, returnByValue=True)
            if found["result"].get("value"):
                break
            if time.monotonic() > deadline:
                raise SystemExit(f"screenshots: {url} did not show {wait_for} in {PAGE_TIMEOUT_S} s")
            await asyncio.sleep(0.5)
        await asyncio.sleep(3)  # charts and lazy cells draw after the text appears
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))
        check_not_blank(path)
        log(f"wrote {path.relative_to(REPO)}")


def check_not_blank(path: Path) -> None:
    from PIL import Image, ImageStat

    with Image.open(path) as image:
        gray = image.convert("L")
        colours = len(image.convert("RGB").getcolors(maxcolors=1 << 20) or [])
        spread = ImageStat.Stat(gray).stddev[0]
    if colours < 50 or spread < 5:
        raise SystemExit(f"screenshots: {path} looks blank ({colours} colours, stddev {spread:.1f})")


async def take(base: str, experiment_id: str, cnn_run: str, onnx_model: str, out: Path) -> None:
    from pipeline import tracking

    runs_url, _ = tracking.ui_links(EXPERIMENT, base)  # the link `make ui` prints
    experiment = f"{base}/#/experiments/{experiment_id}"
    run_page = f"{experiment}/runs/{cnn_run}"
    training = "?workflowType=machine_learning"  # the model-training sidebar, as the printed link has it
    shots = [
        (runs_url, ["fashion-mnist-train", "test_accuracy", "parity"], "mlflow-runs.png", 2000),
        (run_page + training, ["ONNX parity", "fashion-mnist-test"], "mlflow-run-overview.png", WIDTH),
        (f"{run_page}/artifacts/per_class.json{training}", ["Ankle boot", "support"], "mlflow-per-class.png", WIDTH),
        (f"{experiment}/models{training}", ["onnx_model", "test_accuracy"], "mlflow-models.png", 2000),
        (f"{experiment}/models/{onnx_model}{training}", ["parity_max_abs_diff"], "mlflow-onnx-model.png", WIDTH),
        (f"{base}/#/models/fashion-cnn", ["champion", "candidate"], "mlflow-registry.png", WIDTH),
    ]
    async with Chromium() as browser:
        for url, wait_for, name, width in shots:
            await browser.shoot(url, wait_for, out / name, width)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cnn-epochs", type=int, default=5, help="epochs of the CNN run (the default job's 5)")
    parser.add_argument("--reuse", action="store_true", help="photograph the store made last time")
    parser.add_argument("--out", type=Path, default=REPO / "docs", help="where the PNGs go")
    args = parser.parse_args()

    store = REPO / "outputs" / "screenshots" / "mlruns"
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "MLFLOW_TRACKING_URI": f"sqlite:///{store / 'mlflow.db'}",
        "MLFLOW_EXPERIMENT_NAME": EXPERIMENT,
    }
    env.pop("MLFLOW_RUN_ID", None)
    started = time.monotonic()
    if not (args.reuse and (store / "mlflow.db").is_file()):
        make_store(store, env, args.cnn_epochs)
    experiment_id, cnn_run, onnx_model = find_runs(env)
    args.out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = start_ui(store, port)
    try:
        asyncio.run(take(f"http://127.0.0.1:{port}", experiment_id, cnn_run, onnx_model, args.out))
    finally:
        stop(server)
    log(f"done in {time.monotonic() - started:.0f} s; the store stays in {store.relative_to(REPO)}")


if __name__ == "__main__":
    main()
