"""Azure Blob Storage (az://, abfs://, abfss://) through adlfs, set up from the environment only.

Credentials come from the environment, first match wins (never from parameters or configs, so
they never reach a flow run's parameters, a log line or a stored file):

    AZURE_STORAGE_CONNECTION_STRING                       an account key or SAS in one string
    AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_ACCOUNT_KEY  shared key
    AZURE_STORAGE_ACCOUNT_NAME + AZURE_STORAGE_SAS_TOKEN    shared access signature
    AZURE_STORAGE_ACCOUNT_NAME alone                      DefaultAzureCredential: managed identity
                                                          on Azure workers, workload identity,
                                                          AZURE_CLIENT_ID/SECRET/TENANT_ID, az login

`BlobFileSystem` is adlfs's filesystem with three changes: every request is retried with
exponential back-off on transient failures (timeouts, 5xx, connection errors) by the Azure SDK's
own retry policy, so one policy covers writes, reads and listings alike; permanent failures
(authentication, a missing container) are not retried and `describe_error` turns them into one
line; and containers are never created implicitly (a mistyped container name is an error, not a
new container). Whole files go up with `upload_file`: blocks uploaded concurrently, visible only
once the block list is committed.

Transfer settings, also from the environment, read when a filesystem is made (a bad value is an
error of the command that uses Azure, naming the variable, never of an import):

    BERTVISION_AZURE_RETRIES      retries of a failed request, 0 to 20 (default 5)
    BERTVISION_AZURE_CONCURRENCY  blocks uploaded at once, 1 to 256 (default 8)
    BERTVISION_AZURE_BLOCK_MB     MiB per uploaded block, 1 to 4000 (default 8)
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from typing import Any, BinaryIO

from adlfs import AzureBlobFileSystem

from bertvision.storage import StorageError, StorageUnavailable

# Transfer and retry settings: environment variable -> (default, least allowed value).
RETRIES = "BERTVISION_AZURE_RETRIES"  # 5: waits ~3, 5, 9, 17, 33 s
CONCURRENCY = "BERTVISION_AZURE_CONCURRENCY"  # blocks in flight
BLOCK_MB = "BERTVISION_AZURE_BLOCK_MB"  # size of one uploaded block
SETTINGS = {RETRIES: (5, 0), CONCURRENCY: (8, 1), BLOCK_MB: (8, 1)}
# Most allowed: the 20th retry waits ~12 days already; a block holds its MiB in memory while in
# flight, and Azure takes blocks of at most 4000 MiB.
SETTING_MAX = {RETRIES: 20, CONCURRENCY: 256, BLOCK_MB: 4000}


def setting(name: str) -> int:
    """The transfer or retry setting `name` (RETRIES, CONCURRENCY, BLOCK_MB) from the
    environment, else its default; StorageError naming the variable and its allowed range when
    it is not an integer in that range."""
    default, least = SETTINGS[name]
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    most = SETTING_MAX[name]
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not least <= value <= most:
        raise StorageError(
            f"environment variable {name}={text!r} must be an integer from {least} to {most}"
        )
    return value


CONNECTION_STRING = "AZURE_STORAGE_CONNECTION_STRING"
ACCOUNT_NAME = "AZURE_STORAGE_ACCOUNT_NAME"
ACCOUNT_KEY = "AZURE_STORAGE_ACCOUNT_KEY"
SAS_TOKEN = "AZURE_STORAGE_SAS_TOKEN"


def credential_source() -> str:
    """Which of the environment's credentials `azure_storage_options` uses (for messages)."""
    if os.environ.get(CONNECTION_STRING):
        return CONNECTION_STRING
    if not os.environ.get(ACCOUNT_NAME):
        raise StorageError(
            f"no Azure credentials: set {CONNECTION_STRING}, or {ACCOUNT_NAME} with "
            f"{ACCOUNT_KEY}, {SAS_TOKEN} or a managed identity (see README, Azure Blob Storage)"
        )
    if os.environ.get(ACCOUNT_KEY):
        return ACCOUNT_KEY
    if os.environ.get(SAS_TOKEN):
        return SAS_TOKEN
    return "DefaultAzureCredential"


def azure_storage_options() -> dict[str, Any]:
    """adlfs options from the environment: credentials and transfer settings.

    Also usable without BERTVision: `adlfs.AzureBlobFileSystem(**azure_storage_options())`.
    Listings are not cached, since other workers add shards while this process runs.
    """
    source = credential_source()
    options: dict[str, Any] = {"use_listings_cache": False, "max_concurrency": setting(CONCURRENCY)}
    if source != CONNECTION_STRING:
        _check_account(source)
    if source == CONNECTION_STRING:
        options["connection_string"] = os.environ[CONNECTION_STRING]
    elif source == ACCOUNT_KEY:
        options.update(account_name=os.environ[ACCOUNT_NAME], account_key=os.environ[ACCOUNT_KEY])
    elif source == SAS_TOKEN:
        options.update(account_name=os.environ[ACCOUNT_NAME], sas_token=os.environ[SAS_TOKEN])
    else:
        options.update(account_name=os.environ[ACCOUNT_NAME], anon=False)
    return options


def _check_account(source: str) -> None:
    """StorageError naming the variable when the account name is not one Azure gives (3 to 24
    lowercase letters and digits), or the account key is not base64: both would fail only at
    the first request, as an unreachable host or a signing error."""
    name = os.environ[ACCOUNT_NAME]
    if not re.fullmatch(r"[a-z0-9]{3,24}", name):
        raise StorageError(
            f"{ACCOUNT_NAME}={name!r} is not a storage account name "
            "(3 to 24 lowercase letters and digits)"
        )
    if source == ACCOUNT_KEY:
        try:
            base64.b64decode(os.environ[ACCOUNT_KEY], validate=True)
        except binascii.Error:
            raise StorageError(
                f"{ACCOUNT_KEY} is malformed: not base64 (copy the key from the storage "
                "account's Access keys)"
            ) from None


def filesystem() -> BlobFileSystem:
    """The BlobFileSystem for the environment's credentials (fsspec reuses the instance)."""
    return BlobFileSystem(**azure_storage_options())


def retry_policy(retries: int):
    """Exponential back-off for transient failures; the Azure SDK never retries 4xx answers
    such as 403 (authentication) or 404 (missing container), so those fail at once."""
    from azure.storage.blob.aio import ExponentialRetry

    return ExponentialRetry(
        initial_backoff=1,
        increment_base=2,
        retry_total=retries,
        # The SDK caps connection errors and read errors at 3 retries each unless told otherwise.
        retry_connect=retries,
        retry_read=retries,
        retry_status=retries,
        random_jitter_range=1,
    )


class BlobFileSystem(AzureBlobFileSystem):
    """adlfs with BERTVision's retries and block sizes, and without implicit container creation."""

    def __init__(
        self, *args, retries: int | None = None, block_mb: int | None = None, **kwargs
    ) -> None:
        # Read by do_connect, which adlfs calls from __init__; None: the environment's settings.
        self.retries = setting(RETRIES) if retries is None else retries
        self.block_size = (setting(BLOCK_MB) if block_mb is None else block_mb) << 20
        self._containers_seen: set[str] = set()
        super().__init__(*args, **kwargs)

    def do_connect(self) -> None:
        from azure.storage.blob.aio import BlobServiceClient

        options = dict(
            retry_policy=retry_policy(self.retries),
            max_block_size=self.block_size,
            # Larger files go up as concurrent blocks; smaller ones in a single request.
            max_single_put_size=self.block_size,
            min_large_block_upload_threshold=self.block_size + 1,
            user_agent="bertvision",
        )
        if self.connection_string:
            try:
                self.service_client = BlobServiceClient.from_connection_string(
                    self.connection_string, **options
                )
            except ValueError as exc:
                raise StorageError(f"{CONNECTION_STRING} is malformed: {exc}") from None
            return
        host = getattr(self, "account_host", None) or f"{self.account_name}.blob.core.windows.net"
        url = f"https://{host}"
        credential = self.credential or self.account_key
        if credential is None and self.sas_token:
            url += "?" + self.sas_token.lstrip("?")
        try:
            self.service_client = BlobServiceClient(
                account_url=url, credential=credential, **options
            )
        except ValueError as exc:
            raise StorageError(
                f"{ACCOUNT_NAME}={self.account_name!r} with {_source_for_message()} gives no "
                f"usable account URL ({url}): {exc}"
            ) from None

    async def _mkdir(self, path, create_parents=True, delimiter="/", **kwargs) -> None:
        """Blob storage has no folders; only check that the container exists."""
        container = self.split_path(path)[0]
        if not container or container in self._containers_seen:
            return
        async with self.service_client.get_container_client(container) as client:
            await client.get_container_properties()  # a missing container: ContainerNotFound
        self._containers_seen.add(container)

    async def _makedirs(self, path, exist_ok=False) -> None:
        await self._mkdir(path)

    def makedirs(self, path, exist_ok=False) -> None:
        from fsspec.asyn import sync

        sync(self.loop, self._makedirs, path, exist_ok)

    async def _upload(self, data: BinaryIO | bytes, path: str, metadata: dict[str, str]) -> None:
        container, blob, _ = self.split_path(path)
        async with self.service_client.get_blob_client(container, blob) as client:
            await client.upload_blob(
                data,
                overwrite=True,
                metadata={"is_directory": "false", **metadata},
                max_concurrency=self.max_concurrency or 1,
            )
        self.invalidate_cache(self._parent(path))

    async def _upload_file(self, local_path: str, path: str, metadata: dict[str, str]) -> None:
        with open(local_path, "rb") as f:
            await self._upload(f, path, metadata)

    def upload_file(self, local_path: str, path: str, metadata: dict[str, str] | None = None):
        """Upload a local file to `path` as concurrent blocks; the blob appears only when all of
        it is there (its block list is committed last), so no reader sees part of it."""
        from fsspec.asyn import sync

        sync(self.loop, self._upload_file, local_path, path, metadata or {})

    def upload_bytes(self, data: bytes, path: str, metadata: dict[str, str]) -> None:
        """Write `data` to `path` with `metadata` kept beside it, in one request (small files):
        a listing returns the metadata, so readers of many small files can skip reading them.
        Content and metadata are one write: neither is ever seen without the other."""
        from fsspec.asyn import sync

        sync(self.loop, self._upload, data, path, metadata)


def describe_error(exc: BaseException, url: str) -> StorageError | StorageUnavailable | None:
    """A one-line error for an Azure failure at `url`, or None if `exc` is not one.

    Permanent failures become StorageError (a ValueError: retrying cannot help); transient ones
    that outlasted the retries become StorageUnavailable (a ConnectionError: a later try may work).
    """
    from azure.core.exceptions import (
        ClientAuthenticationError,
        HttpResponseError,
        ResourceNotFoundError,
        ServiceRequestError,
        ServiceResponseError,
    )

    cause = _azure_cause(exc)
    if cause is None:
        return None
    account = _account_name()
    container = url.split("://", 1)[-1].split("/", 1)[0]
    code = getattr(cause, "error_code", None) or ""
    code = str(getattr(code, "value", code))  # the SDK gives an enum member where it knows it
    status = getattr(cause, "status_code", None)
    if isinstance(cause, ResourceNotFoundError) and code == "ContainerNotFound":
        return StorageError(
            f"{url}: container '{container}' does not exist in account '{account}'; create it first"
        )
    if isinstance(cause, ClientAuthenticationError) and status is None:
        return StorageError(
            f"{url}: no Azure credential for account '{account}': {_first_line(cause)}"
        )
    if status == 401 or code in ("AuthenticationFailed", "AuthorizationFailure"):
        return StorageError(
            f"{url}: authentication failed for account '{account}' ({code or status}); "
            f"check {_source_for_message()}"
        )
    if status == 403:
        return StorageError(
            f"{url}: access denied in account '{account}' ({code}); the credential from "
            f"{_source_for_message()} lacks a permission (e.g. Storage Blob Data Contributor)"
        )
    if isinstance(cause, ServiceRequestError | ServiceResponseError):
        return StorageUnavailable(
            f"{url}: Azure Blob Storage unreachable after {setting(RETRIES)} retries: "
            f"{_first_line(cause)}"
        )
    if isinstance(cause, HttpResponseError) and status is not None and status >= 500:
        return StorageUnavailable(
            f"{url}: Azure Blob Storage failed after {setting(RETRIES)} retries: {status} {code}"
        )
    if isinstance(cause, HttpResponseError):
        return StorageError(f"{url}: {status} {code}: {_first_line(cause)}")
    return None


def _azure_cause(exc: BaseException | None):
    """The Azure SDK error behind `exc` (adlfs wraps some in RuntimeError or ValueError)."""
    from azure.core.exceptions import AzureError

    seen = 0
    while exc is not None and seen < 5:
        if isinstance(exc, AzureError):
            return exc
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return None


def _first_line(exc: BaseException) -> str:
    text = str(getattr(exc, "message", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _account_name() -> str:
    if connection_string := os.environ.get(CONNECTION_STRING):
        parts = dict(p.split("=", 1) for p in connection_string.split(";") if "=" in p)
        return parts.get("AccountName", "?")
    return os.environ.get(ACCOUNT_NAME, "?")


def _source_for_message() -> str:
    try:
        return credential_source()
    except StorageError:
        return "the AZURE_STORAGE_* environment variables"
