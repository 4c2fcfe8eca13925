"""Azurite, Microsoft's Azure Storage emulator, for the Azure tests: started here, never mocked.

    service = Azurite(tmp_path / "azurite").start()    # 127.0.0.1, a free port, data in tmp_path
    use_only(service, monkeypatch)                     # AZURE_STORAGE_CONNECTION_STRING -> it
    service.stop(); service.start()                    # an outage: same port, same data

Starting skips the test, saying why, when the azurite binary is not installed (scripts/setup
installs it with npm).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
AZURITE_BLOB = REPO / ".tools" / "node_modules" / ".bin" / "azurite-blob"

# Azurite's fixed development account (public, documented by Microsoft; not a secret).
ACCOUNT = "devstoreaccount1"
KEY = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Azurite:
    """One Azurite blob service process on 127.0.0.1, storing its data under `location`."""

    def __init__(self, location: Path, port: int | None = None) -> None:
        self.location = Path(location)
        self.port = port or free_port()
        self.process: subprocess.Popen | None = None

    def connection_string(self, key: str = KEY) -> str:
        return (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
            f"BlobEndpoint=http://127.0.0.1:{self.port}/{ACCOUNT};"
        )

    def start(self, timeout: float = 60) -> Azurite:
        if not AZURITE_BLOB.exists():
            pytest.skip(f"Azurite is not installed at {AZURITE_BLOB} (run scripts/setup)")
        self.location.mkdir(parents=True, exist_ok=True)
        log = open(self.location / "azurite.log", "ab")  # noqa: SIM115 - owned by the process
        self.process = subprocess.Popen(
            [
                str(AZURITE_BLOB),
                "--blobHost",
                "127.0.0.1",
                "--blobPort",
                str(self.port),
                "--location",
                str(self.location),
                "--skipApiVersionCheck",
                "--disableTelemetry",
                "--silent",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"Azurite exited ({self.process.returncode}); see {self.location}/azurite.log"
                )
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Azurite did not listen on port {self.port} within {timeout} s")

    def stop(self) -> None:
        """Shut down the way a server goes down for maintenance (SIGTERM: data is kept)."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def create_container(self, name: str | None = None) -> str:
        from azure.storage.blob import BlobServiceClient

        name = name or f"c{uuid.uuid4().hex[:12]}"
        with BlobServiceClient.from_connection_string(self.connection_string()) as client:
            client.create_container(name)
        return name


def use_only(service: Azurite, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Give this process the environment a worker has: AZURE_STORAGE_CONNECTION_STRING for
    `service` and no other AZURE_STORAGE_* credentials. Returns it whole, for subprocesses."""
    for name in list(os.environ):
        if name.startswith("AZURE_STORAGE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", service.connection_string())
    return dict(os.environ)
