"""Latency and throughput of the API's two heaviest reads, next to their in-process cost.

Starts the API (uvicorn, one process, embedded mode) on 127.0.0.1 on a free port with a
temporary IWAE_HOME holding one model, then for 1 and 8 concurrent clients (threads with
httpx, keep-alive) sends a bounded number of

    POST /loglik?k=5000   (a 200x200 PNG of a digit: decode, preprocess, K=5000 estimate)
    GET  /samples?n=16    (16 samples, encoded as a PNG grid)

and reports p50/p95 latency and requests/s. Then it makes the same calls in this process,
without HTTP (the same functions the routes call, from 1 and 8 threads), so the table shows
what HTTP, the thread pool and the server add. It stops by itself.

The model is Burda et al.'s one-layer architecture (784-200-200-50) freshly initialised:
the cost of a forward pass does not depend on what the weights learnt. `--model DIR` serves
a trained model directory instead (one with model.safetensors), and `--train-epochs N` trains
one first on MNIST from `--data-dir` (a few seconds per epoch on a subset).

    python bench/api_latency.py [--requests 48] [--layers 1] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import torch
from bench_args import add_data_dir_argument
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app import inference  # noqa: E402
from app.images import binarize, encode_png_grid, preprocess  # noqa: E402
from app.registry import ModelRegistry  # noqa: E402
from app.settings import Settings  # noqa: E402
from models.checkpoint import TrainState, save_checkpoint  # noqa: E402
from models.config import ModelConfig, TrainConfig  # noqa: E402
from models.networks import IWAEModel  # noqa: E402

MODEL_ID = "bench0000000000000000000000000000"


@dataclass
class Row:
    workload: str
    clients: int
    requests: int
    p50_ms: float
    p95_ms: float
    per_s: float
    errors: int = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=48, help="per workload and concurrency")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--k", type=int, default=5000, help="importance samples of /loglik")
    parser.add_argument("--n", type=int, default=16, help="samples per /samples request")
    parser.add_argument("--layers", type=int, choices=(1, 2), default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--chunk-size", type=int, default=None, help="IWAE_LOGLIK_CHUNK_SIZE")
    parser.add_argument("--torch-threads", type=int, default=None, help="IWAE_TORCH_THREADS")
    parser.add_argument("--model", type=Path, help="serve this trained model directory")
    parser.add_argument("--train-epochs", type=int, default=0, help="train a model first")
    parser.add_argument("--train-size", type=int, default=10_000)
    add_data_dir_argument(parser)
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def prepare_model(args: argparse.Namespace, models_dir: Path) -> None:
    """Put one model, with its model.json, at models_dir/MODEL_ID."""
    directory = models_dir / MODEL_ID
    directory.mkdir(parents=True)
    if args.model is not None:
        source = args.model / "model.safetensors" if args.model.is_dir() else args.model
        shutil.copy(source, directory / "model.safetensors")
        config = json.loads((args.model / "model.json").read_text())["config"]
    elif args.train_epochs > 0:
        from models.data import load_mnist
        from models.run import train_and_evaluate

        train_config = TrainConfig(
            k=5,
            epochs=args.train_epochs,
            model=ModelConfig(layers=args.layers),
            train_size=args.train_size,
            eval_size=0,
            device=args.device,
        )
        print(f"training {args.train_epochs} epoch(s) on {args.train_size} images ...")
        train_and_evaluate(train_config, load_mnist(args.data_dir), directory)
        config = train_config.to_dict()
    else:
        train_config = TrainConfig(k=5, model=ModelConfig(layers=args.layers), eval_size=0)
        torch.manual_seed(0)
        model = IWAEModel(train_config.model)
        save_checkpoint(
            directory / "model.safetensors",
            model,
            torch.optim.Adam(model.parameters()),
            train_config,
            TrainState(),
            torch.Generator().manual_seed(0),
        )
        config = train_config.to_dict()
    description = {
        "model_id": MODEL_ID,
        "job_id": MODEL_ID,
        "config": config,
        "metrics": None,
        "created_at": datetime.now(UTC).isoformat(),
    }
    (directory / "model.json").write_text(json.dumps(description))


def digit_png() -> bytes:
    """A '7' drawn dark on white, 200x200, as a user would upload it."""
    image = Image.new("L", (200, 200), 255)
    draw = ImageDraw.Draw(image)
    draw.line((40, 40, 160, 40), fill=0, width=16)
    draw.line((160, 40, 80, 180), fill=0, width=16)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(home: Path, port: int, args: argparse.Namespace) -> subprocess.Popen[bytes]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IWAE_")}
    env.update(IWAE_HOME=str(home), IWAE_INFERENCE_DEVICE=args.device)
    if args.chunk_size:
        env["IWAE_LOGLIK_CHUNK_SIZE"] = str(args.chunk_size)
    if args.torch_threads:
        env["IWAE_TORCH_THREADS"] = str(args.torch_threads)
    command = [sys.executable, "-m", "uvicorn", "app.main:create_app", "--factory"]
    command += ["--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    command += ["--no-access-log"]
    return subprocess.Popen(command, cwd=ROOT, env=env)


def wait_ready(base: str, server: subprocess.Popen[bytes], timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{base}/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"the server did not become ready in {timeout_s} s")


def run_concurrently(
    call: Callable[[int], bool], clients: int, requests: int
) -> tuple[list[float], float, int]:
    """`requests` calls spread over `clients` threads: (latencies s, wall s, failures)."""
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()
    per_client = [requests // clients + (i < requests % clients) for i in range(clients)]

    def client(index: int) -> None:
        nonlocal failures
        for _ in range(per_client[index]):
            start = time.perf_counter()
            ok = call(index)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)
                failures += not ok

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - start, failures


def summarise(name: str, clients: int, latencies: list[float], wall: float, errors: int) -> Row:
    ms = np.array(latencies) * 1000
    return Row(
        workload=name,
        clients=clients,
        requests=len(latencies),
        p50_ms=float(np.percentile(ms, 50)),
        p95_ms=float(np.percentile(ms, 95)),
        per_s=len(latencies) / wall,
        errors=errors,
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.torch_threads:  # the in-process side runs like the server
        torch.set_num_threads(args.torch_threads)
    png = digit_png()
    with tempfile.TemporaryDirectory(prefix="iwae-bench-") as tmp:
        home = Path(tmp)
        prepare_model(args, home / "models")
        settings = Settings(
            home=home,
            inference_device=args.device,
            **({"loglik_chunk_size": args.chunk_size} if args.chunk_size else {}),
        )
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        server = start_server(home, port, args)
        try:
            wait_ready(base, server)
            http_rows = measure_http(base, png, args)
        finally:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
        local_rows = measure_in_process(home, settings, png, args)
    report(args, settings, http_rows, local_rows)


def measure_http(base: str, png: bytes, args: argparse.Namespace) -> list[Row]:
    clients = {
        c: [httpx.Client(base_url=base, timeout=120) for _ in range(c)] for c in args.clients
    }

    def loglik(pool: list[httpx.Client]) -> Callable[[int], bool]:
        def call(i: int) -> bool:
            files = {"file": ("digit.png", png, "image/png")}
            return pool[i].post("/loglik", params={"k": args.k}, files=files).status_code == 200

        return call

    def samples(pool: list[httpx.Client]) -> Callable[[int], bool]:
        def call(i: int) -> bool:
            return pool[i].get("/samples", params={"n": args.n}).status_code == 200

        return call

    rows = []
    for name, make in ((f"POST /loglik?k={args.k}", loglik), (f"GET /samples?n={args.n}", samples)):
        for count in args.clients:
            call = make(clients[count])
            for i in range(count):  # warm-up: model load, connections, allocator
                call(i)
            rows.append(summarise(name, count, *run_concurrently(call, count, args.requests)))
    for pool in clients.values():
        for client in pool:
            client.close()
    return rows


def measure_in_process(
    home: Path, settings: Settings, png: bytes, args: argparse.Namespace
) -> list[Row]:
    """The routes' computations as plain function calls, from threads, without HTTP."""
    served = ModelRegistry(home / "models", device=args.device).load(MODEL_ID)

    def loglik(_: int) -> bool:
        digit = binarize(preprocess(png, settings.max_image_pixels))
        inference.score(served, digit, args.k, chunk_size=settings.loglik_chunk_size)
        return True

    def samples(_: int) -> bool:
        encode_png_grid(inference.sample(served, args.n))
        return True

    rows = []
    for name, call in ((f"POST /loglik?k={args.k}", loglik), (f"GET /samples?n={args.n}", samples)):
        for count in args.clients:
            for i in range(count):
                call(i)
            rows.append(summarise(name, count, *run_concurrently(call, count, args.requests)))
    return rows


def report(args: argparse.Namespace, settings: Settings, http: list[Row], local: list[Row]) -> None:
    arch = "784-200-200-50" if args.layers == 1 else "784-100-100-100-50 (two stochastic)"
    device = args.device
    if device == "cuda":
        device += f" ({torch.cuda.get_device_name()})"
    print()
    print(f"API latency: model {arch}, device {device}, loglik chunk {settings.loglik_chunk_size}")
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch "
        f"{torch.__version__} with {torch.get_num_threads()} threads; {args.requests} requests "
        "per row after a warm-up"
    )
    print()
    header = (
        f"{'workload':<22} {'clients':>7} | {'HTTP p50 ms':>11} {'p95 ms':>8} {'req/s':>7}"
        f" | {'in-process p50 ms':>17} {'p95 ms':>8} {'calls/s':>7}"
    )
    print(header)
    print("-" * len(header))
    for h, lo in zip(http, local, strict=True):
        errors = f"  ({h.errors} errors)" if h.errors else ""
        print(
            f"{h.workload:<22} {h.clients:>7} | {h.p50_ms:>11.1f} {h.p95_ms:>8.1f} {h.per_s:>7.1f}"
            f" | {lo.p50_ms:>17.1f} {lo.p95_ms:>8.1f} {lo.per_s:>7.1f}{errors}"
        )
    if args.json:
        rows = [
            {"http": vars(h), "in_process": vars(lo)} for h, lo in zip(http, local, strict=True)
        ]
        args.json.write_text(json.dumps({"device": device, "arch": arch, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
