"""The commit's server-side copies on S3 through obstore, with s3fs as the fallback.

What bounds a commit of many shards on S3 is the client's CPU, not the store:
botocore (under s3fs) signs, sends and parses each CopyObject in Python, 3-4 ms
of one core per request on the project's machine, so one process sends at most
about 300 a second. obstore (Rust bindings of the ``object_store`` crate) does
the same request for 0.6-0.9 ms, measured side by side against the same server
(``benchmarks/bench_s3.py``). So when obstore is installed (the ``s3`` extra)
the commit sends its copies through it, unless ``imgsink.commit-obstore`` is
``False``.

It is used only where it sends exactly the request s3fs would:

- the filesystem's settings are plain ones: endpoint, region, credentials,
  pool and timeouts (:func:`unsupported_setting`). Not ``s3_additional_kwargs``
  (encryption keys, ACLs), ``requester_pays``, ``anon``, a ``session`` of the
  caller's, or ``client_kwargs`` beyond the endpoint and region (TLS settings
  among them): those keep every copy on s3fs;
- the endpoint, region and credentials are the ones the filesystem's own
  botocore client resolved, so explicit keys, profiles, environment variables
  and instance roles all carry over, and credentials that expire are frozen
  anew from botocore (:class:`_BotocoreCredentials`);
- the object is at most 5 GiB (one CopyObject's limit; larger ones go through
  s3fs, which copies them in parts), and both names are in one bucket.

A copy obstore fails is sent again through s3fs, which raises the error if it
is real; a warning names obstore's error. The first file is copied alone, and
if obstore fails it, every file goes through s3fs: a store that obstore cannot
talk to costs one failed request, never a failed commit.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import dask
import fsspec.asyn

from .storage import CONCURRENCY, MAX_SINGLE_COPY

logger = logging.getLogger(__name__)

#: ``dask.config`` key: send the commit's copies through obstore where it can (default ``True``).
OBSTORE_KEY = "imgsink.commit-obstore"
#: How long obstore keeps credentials before asking botocore again (botocore refreshes its own ahead of expiry).
CREDENTIALS_TTL = timedelta(minutes=5)
#: A CopyObject of a large object takes S3 a while to answer; obstore's default request timeout is 30 s.
REQUEST_TIMEOUT = timedelta(minutes=15)

#: s3fs settings that change nothing in a CopyObject request beyond what is taken from its client.
_PLAIN_OPTIONS = {"key", "secret", "token", "username", "password", "profile", "endpoint_url", "client_kwargs",
                  "config_kwargs", "use_ssl", "cache_regions", "version_aware", "skip_instance_cache",
                  "use_listings_cache", "listings_expiry_time", "max_concurrency", "default_block_size",
                  "default_fill_cache", "default_cache_type", "fixed_upload_size", "asynchronous", "loop"}
_PLAIN_CLIENT_KWARGS = {"endpoint_url", "region_name"}
_PLAIN_CONFIG_KWARGS = {"max_pool_connections", "connect_timeout", "read_timeout"}


def obstore_setting() -> bool:
    """The ``imgsink.commit-obstore`` setting, read where the graph is built (a client-side
    ``dask.config.set`` does not reach the workers that run the commit)."""
    value = dask.config.get(OBSTORE_KEY, True)
    if not isinstance(value, bool):
        raise ValueError(f"dask config {OBSTORE_KEY}={value!r} must be True (send the commit's S3 copies "
                         "through obstore when it is installed) or False (through s3fs)")
    return value


def unsupported_setting(fs) -> str | None:
    """The first of ``fs``'s settings that obstore would not reproduce in a CopyObject, or None."""
    options = fs.storage_options
    for name, value in options.items():
        if name not in _PLAIN_OPTIONS and value:
            return name
    for group, plain in (("client_kwargs", _PLAIN_CLIENT_KWARGS), ("config_kwargs", _PLAIN_CONFIG_KWARGS)):
        for name in set(options.get(group) or {}) - plain:
            return f"{group}[{name!r}]"
    return None


def usable(fs) -> bool:
    """Whether obstore can send ``fs``'s copies: installed, and no setting it would not reproduce."""
    return _importable() and unsupported_setting(fs) is None


def copy_fast(fs, moves: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """Copy through obstore what it can of ``moves`` (``(staged, final, size)`` each, on s3fs ``fs``);
    return the moves left for s3fs: all of them when obstore is not to be used, else those too large
    for one CopyObject and those whose copy failed. Every copy has ended when this returns."""
    if not moves or not usable(fs) or _in_event_loop():
        return moves
    bucket = fs.split_path(moves[0][0])[0]
    fits = _fitting(fs, moves, bucket)  # (move, source key, destination key)
    if not fits:
        return moves
    try:
        store = _store(fs, bucket)
    except Exception as exc:  # obstore refused the settings, or botocore found no credentials: s3fs copies
        logger.warning("obstore could not be set up for s3://%s (%s: %s); copying through s3fs", bucket,
                       type(exc).__name__, exc)
        return moves
    if store is None:
        return moves
    failed = asyncio.run(_copy_all(store, [(source, destination) for _, source, destination in fits]))
    if failed:
        error = failed[0][1]
        logger.warning("obstore failed %d of %d copies (%s: %s); sending them through s3fs", len(failed), len(fits),
                       type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    copied = {id(move) for move, _, _ in fits} - {id(fits[i][0]) for i, _ in failed}
    return [move for move in moves if id(move) not in copied]


def _fitting(fs, moves: list[tuple[str, str, int]], bucket: str) -> list[tuple[tuple, str, str]]:
    """The moves one CopyObject within ``bucket`` can do, each with its source and destination keys."""
    fits = []
    for move in moves:
        (source_bucket, source, _), (destination_bucket, destination, _) = map(fs.split_path, move[:2])
        if move[2] <= MAX_SINGLE_COPY and source_bucket == bucket == destination_bucket:
            fits.append((move, source, destination))
    return fits


def _importable() -> bool:
    try:
        import obstore  # noqa: F401
        from obstore.store import S3Store  # noqa: F401
    except ImportError:  # not installed (the s3 extra), or a broken install: s3fs copies everything
        return False
    return True


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True  # asyncio.run would refuse: this thread already runs a loop


async def _copy_all(store, pairs: list[tuple[str, str]]) -> list[tuple[int, BaseException]]:
    """CopyObject each ``(source, destination)`` key pair, ``CONCURRENCY`` at a time; the failed ones'
    indexes and errors, once every copy has ended. The first pair is copied alone: if that fails
    (a store obstore cannot talk to, a bucket in another region), every pair counts as failed and no
    other request is sent, rather than one failure per file."""
    import obstore

    try:
        await obstore.copy_async(store, *pairs[0])
    except Exception as exc:
        return [(i, exc) for i in range(len(pairs))]
    limit = asyncio.Semaphore(CONCURRENCY)

    async def copy(source: str, destination: str) -> None:
        async with limit:
            await obstore.copy_async(store, source, destination)
    results = await asyncio.gather(*(copy(*pair) for pair in pairs[1:]), return_exceptions=True)
    return [(i + 1, r) for i, r in enumerate(results) if isinstance(r, BaseException)]


def _store(fs, bucket: str):
    """An obstore ``S3Store`` for ``bucket`` with the endpoint, region and credentials of ``fs``'s
    botocore client; None when that client signs no requests (anonymous)."""
    from obstore.store import S3Store

    async def resolve():
        await fs.set_session()
        return await fs.get_s3(bucket)
    client = fsspec.asyn.sync(fs.loop, resolve)
    credentials = getattr(getattr(client, "_request_signer", None), "_credentials", None)
    if credentials is None:
        return None
    endpoint, region = client.meta.endpoint_url, client.meta.region_name
    config: dict[str, Any] = {"region": region}
    if endpoint and not _is_aws(endpoint):
        config.update(endpoint=endpoint, virtual_hosted_style_request=False)
    else:
        config["virtual_hosted_style_request"] = True  # as botocore addresses AWS buckets
    return S3Store(bucket, config=config, credential_provider=_BotocoreCredentials(fs, credentials),
                   client_options={"allow_http": bool(endpoint) and endpoint.startswith("http://"),
                                   "timeout": REQUEST_TIMEOUT, "user_agent": user_agent()})


def user_agent() -> str:
    """The User-Agent of our obstore requests (what a store's access log shows for the commit's copies)."""
    import obstore

    from . import __version__

    return f"dask-imgsink/{__version__} obstore/{obstore.__version__}"


def _is_aws(endpoint: str) -> bool:
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":", 1)[0]
    return host.endswith(".amazonaws.com") or host.endswith(".amazonaws.com.cn")


class _BotocoreCredentials:
    """obstore's credential provider: the credentials of the filesystem's botocore client, frozen anew
    every :data:`CREDENTIALS_TTL` (botocore refreshes temporary ones ahead of their expiry)."""

    def __init__(self, fs, credentials) -> None:
        self.fs, self.credentials = fs, credentials

    def __call__(self) -> dict:
        frozen = fsspec.asyn.sync(self.fs.loop, self.credentials.get_frozen_credentials)
        return {"access_key_id": frozen.access_key, "secret_access_key": frozen.secret_key,
                "token": frozen.token, "expires_at": datetime.now(UTC) + CREDENTIALS_TTL}
