"""Upload throughput of one large shard to Azure Blob Storage, for several settings, in one run.

    python benchmarks/bench_azure_upload.py               # starts Azurite on 127.0.0.1 (temp data)
    python benchmarks/bench_azure_upload.py --mb 512 --container bench   # real account: credentials
                                                       # from AZURE_STORAGE_* as everywhere

Each setting writes the same incompressible payload in 1 MiB pieces (as the Parquet writer does)
and stops the clock when the blob is committed. "stream" is adlfs's file object (`fs.open(...,
"wb")`), which uploads one block per filled buffer, one at a time; "stream+copy" adds the
server-side copy and delete that a rename from _incomplete/ costs on blob storage (the former
shard commit); "staged" is what ShardWriter does now (storage.StagedWrite): spool to a local file,
then upload its blocks `concurrency` at a time. MB/s = payload MiB / seconds, best of --repeat.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from bertvision.azure import BlobFileSystem  # noqa: E402

PIECE = 1 << 20


def stream(fs: BlobFileSystem, path: str, payload: bytes, block_mb: int, copy: bool) -> None:
    target = f"{path}.incomplete" if copy else path
    with fs.open(target, "wb", block_size=block_mb << 20) as f:
        for start in range(0, len(payload), PIECE):
            f.write(payload[start : start + PIECE])
    if copy:
        fs.mv(target, path)


def staged(fs: BlobFileSystem, path: str, payload: bytes) -> None:
    handle, local = tempfile.mkstemp(suffix=".staged")
    try:
        with os.fdopen(handle, "wb") as f:
            for start in range(0, len(payload), PIECE):
                f.write(payload[start : start + PIECE])
        fs.upload_file(local, path, {"sha256": "bench"})
    finally:
        os.remove(local)


def main() -> None:
    parser = argparse.ArgumentParser(
        formatter_class=argparse.ArgumentDefaultsHelpFormatter, description=__doc__.splitlines()[0]
    )
    parser.add_argument("--mb", type=int, default=128, help="payload size in MiB")
    parser.add_argument("--repeat", type=int, default=2, help="runs per setting (best counts)")
    parser.add_argument("--container", default="", help="an existing container (real account)")
    args = parser.parse_args()

    service = None
    if args.container:
        container = args.container
        from bertvision.azure import azure_storage_options

        options = azure_storage_options()
    else:
        from azurite import Azurite

        service = Azurite(Path(tempfile.mkdtemp(prefix="bench-azurite-"))).start()
        container = service.create_container()
        options = {"connection_string": service.connection_string()}
        print(f"Azurite on 127.0.0.1:{service.port} (data in {service.location})")

    payload = os.urandom(args.mb << 20)
    settings = [
        ("stream", 4, 1),
        ("stream", 50, 1),  # adlfs's default block size
        ("stream+copy", 50, 1),
        ("staged", 4, 1),
        ("staged", 4, 4),
        ("staged", 4, 8),
        ("staged", 8, 8),
        ("staged", 16, 8),
        ("staged", 8, 16),
    ]
    print(f"payload {args.mb} MiB, best of {args.repeat}")
    print(f"{'method':<12} {'block MiB':>9} {'concurrency':>11} {'seconds':>8} {'MB/s':>7}")
    try:
        for method, block_mb, concurrency in settings:
            fs = BlobFileSystem(
                **{**options, "max_concurrency": concurrency},
                block_mb=block_mb,
                skip_instance_cache=True,
            )
            best = float("inf")
            for _ in range(args.repeat):
                path = f"{container}/bench/{uuid.uuid4().hex}.bin"
                started = time.perf_counter()
                if method == "staged":
                    staged(fs, path, payload)
                else:
                    stream(fs, path, payload, block_mb, copy=method == "stream+copy")
                best = min(best, time.perf_counter() - started)
                assert fs.size(path) == len(payload)
                fs.rm_file(path)
            print(
                f"{method:<12} {block_mb:>9} {concurrency:>11} {best:>8.2f} {args.mb / best:>7.1f}"
            )
    finally:
        if service is not None:
            service.stop()


if __name__ == "__main__":
    main()
