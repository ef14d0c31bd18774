"""A big artifact to and from S3 (moto's server on localhost): flowmagic's
CachedObjectStore vs plain s3fs put/get of the same bytes.

flowmagic's save hashes the value as it serialises it, writes the local cache
and uploads the object once (multipart, FLOWMAGIC_STORE_PART_SIZE); its load,
from a home whose cache is empty, downloads into the cache, verifies the hash
and maps the file. s3fs's put/get move the same bytes from and to memory.

    python benchmarks/bench_s3.py [--mb 1024] [--repeat 3]
    python benchmarks/bench_s3.py --foreach 100     # per-task overhead: local store vs S3 store

Needs the test extra (s3fs, moto[server]). Target (issue 18): within 1.3x.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import numpy as np


def start_moto() -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=2).read()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise SystemExit("moto_server did not start")


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mb", type=int, default=1024, help="artifact size in MB (default 1024)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--foreach", type=int, default=0, metavar="N",
                    help="instead: a foreach of N trivial tasks, whole command, local store vs S3 store")
    args = ap.parse_args()
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    proc, endpoint = start_moto()
    os.environ["FLOWMAGIC_S3_ENDPOINT_URL"] = endpoint
    try:
        if args.foreach:
            return bench_foreach(args.foreach, args.repeat, endpoint)
        import s3fs

        from flowmagic.store import load_artifact, save_artifact
        from flowmagic.store.backends import FsspecBackend
        from flowmagic.store.remote import CachedObjectStore

        fs = s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True)
        fs.mkdir("bench-bucket")
        rng = np.random.default_rng(0)
        # moto's first big upload is much slower than the next ones (it grows its buffers):
        # pay that once, untimed, so neither side's first round carries it
        fs.pipe_file("bench-bucket/warm-up", rng.bytes(max(args.mb // 4, 8) * 2**20), chunksize=64 * 2**20)
        fs.rm("bench-bucket/warm-up")
        rows = []
        for i in range(args.repeat):
            value = rng.random(args.mb * 1024 * 1024 // 8)   # fresh bytes each round: nothing de-duplicated
            raw = value.tobytes()
            name = f"bench-bucket/plain/{uuid.uuid4().hex}"
            plain_put = timed(lambda: fs.pipe_file(name, raw, chunksize=64 * 2**20))   # noqa: B023
            plain_get = timed(lambda: fs.cat_file(name))   # noqa: B023
            fs.rm(name)
            with tempfile.TemporaryDirectory() as tmp:
                url = f"s3://bench-bucket/fm-{i}"
                writer = CachedObjectStore(Path(tmp) / "w", FsspecBackend(url))
                refs = []
                fm_put = timed(lambda: refs.append(save_artifact(writer, "x", value)))   # noqa: B023
                reader = CachedObjectStore(Path(tmp) / "r", FsspecBackend(url))   # an empty cache
                fm_get = timed(lambda: float(load_artifact(reader, refs[0]).sum()))   # noqa: B023
            rows.append((plain_put, fm_put, plain_get, fm_get))
            print(f"round {i + 1}: put s3fs {plain_put:.2f} s, flowmagic {fm_put:.2f} s ({fm_put / plain_put:.2f}x); "
                  f"get s3fs {plain_get:.2f} s, flowmagic {fm_get:.2f} s ({fm_get / plain_get:.2f}x)", flush=True)
        put = statistics.median(r[1] / r[0] for r in rows)
        get = statistics.median(r[3] / r[2] for r in rows)
        print(f"{args.mb} MB, median of {len(rows)}: save {put:.2f}x s3fs put, load {get:.2f}x s3fs get "
              "(load includes reading the whole array once; target 1.3x)")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def bench_foreach(n: int, repeat: int, endpoint: str) -> None:
    import nbformat
    import s3fs

    s3fs.S3FileSystem(endpoint_url=endpoint, skip_instance_cache=True).mkdir("bench-foreach")
    with tempfile.TemporaryDirectory() as tmp:
        nb = nbformat.v4.new_notebook()
        nb.cells = [nbformat.v4.new_code_cell(c) for c in (
            f"%%step start\nitems = list(range({n}))",
            "%%step work --foreach items\ny = input * 2",
            "%%step join\ntotal = sum(y)")]
        path = Path(tmp) / "bench_foreach.ipynb"
        nbformat.write(nb, path)
        exe = shutil.which("flowmagic", path=str(Path(sys.executable).parent)) or "flowmagic"
        times: dict[str, list[float]] = {"local": [], "s3": []}
        for i in range(repeat):
            for kind in times:
                env = {**os.environ, "FLOWMAGIC_HOME": f"{tmp}/{kind}-{i}"}
                env.pop("FLOWMAGIC_STORE", None)
                if kind == "s3":
                    env["FLOWMAGIC_STORE"] = f"s3://bench-foreach/r{i}"
                t0 = time.perf_counter()
                subprocess.run([exe, "run", str(path)], env=env, check=True, capture_output=True)
                times[kind].append(time.perf_counter() - t0)
        local, s3 = statistics.median(times["local"]), statistics.median(times["s3"])
        print(f"foreach of {n}, whole command, median of {repeat}: local {local:.2f} s, S3 {s3:.2f} s "
              f"({s3 / local:.2f}x; {(s3 - local) / n * 1000:.0f} ms more per task)")


if __name__ == "__main__":
    main()
