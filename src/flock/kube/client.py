"""The HTTP side: a configured client, API errors, list pages and watch streams.

lightkube reads the kubeconfig (or the in-cluster service account, re-reading
the rotated token on 401) and gives an httpx2 `AsyncClient` with base URL, TLS
and auth set; everything else is plain requests against API paths, so the
informer controls resourceVersion, bookmarks and timeouts itself.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any, Generic, TypeVar

import httpx2
import msgspec

from flock.kube.records import Codec, Item, StatusRecord, WatchEvent

log = logging.getLogger(__name__)

V = TypeVar("V")

_status = msgspec.json.Decoder(StatusRecord)


class ApiError(Exception):
    """The API server answered with an error status (or the connection failed: status 0)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}" if status else message)
        self.status = status
        self.reason = reason
        self.message = message


class Gone(ApiError):
    """410: the resourceVersion (or continue token) is older than etcd keeps; relist."""


def _error(status: int, body: bytes) -> ApiError:
    try:
        st = _status.decode(body)
        reason, message = st.reason, st.message
    except (msgspec.DecodeError, msgspec.ValidationError):
        reason, message = "", body[:200].decode(errors="replace")
    return (Gone if status == 410 else ApiError)(status, reason, message)


class KubeClient:
    """A thin async client for the few calls flock makes."""

    def __init__(self, http: httpx2.AsyncClient) -> None:
        self.http = http

    @classmethod
    def from_kubeconfig(cls, path: str | None = None, *, timeout: float = 10.0) -> KubeClient:
        """`path` None means in-cluster (the pod's service account)."""
        from lightkube.config.client_adapter import AsyncClient, ConnectionParams
        from lightkube.config.kubeconfig import KubeConfig

        conf = KubeConfig.from_service_account() if path is None else KubeConfig.from_file(path)
        single = conf.get()
        if single is None:
            raise ValueError(f"kubeconfig {path} has no current context")
        params = ConnectionParams(timeout=httpx2.Timeout(timeout), trust_env=False)
        return cls(AsyncClient(single, params))

    async def close(self) -> None:
        await self.http.aclose()

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> bytes:
        """The response body of a 2xx answer; raises ApiError otherwise."""
        content = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json"}
        if content is not None:
            headers["Content-Type"] = content_type
        try:
            resp = await self.http.request(
                method, path, params=dict(params or {}), content=content, headers=headers
            )
        except httpx2.HTTPError as e:
            raise ApiError(0, "ConnectionError", f"{method} {path}: {type(e).__name__}: {e}") from e
        if resp.status_code >= 300:
            raise _error(resp.status_code, resp.content)
        return resp.content

    async def get(self, path: str) -> bytes | None:
        """The object, or None if it does not exist (404)."""
        try:
            return await self.request("GET", path)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    async def watch_lines(
        self, path: str, params: Mapping[str, str], *, read_timeout: float
    ) -> AsyncIterator[bytes]:
        """The lines of one watch response; ends when the server closes it."""
        timeout = httpx2.Timeout(10.0, read=read_timeout)
        try:
            async with self.http.stream("GET", path, params=dict(params), timeout=timeout) as resp:
                if resp.status_code >= 300:
                    raise _error(resp.status_code, await resp.aread())
                async for line in resp.aiter_lines():
                    if line:
                        yield line.encode()
        except httpx2.HTTPError as e:
            raise ApiError(0, "ConnectionError", f"watch {path}: {type(e).__name__}: {e}") from e


class HttpSource(Generic[V]):
    """List and watch one resource collection over HTTP (the informer's `Source`)."""

    def __init__(
        self,
        client: KubeClient,
        path: str,
        codec: Codec[Any, V],
        *,
        field_selector: str = "",
        label_selector: str = "",
    ) -> None:
        self.client = client
        self.path = path
        self.codec = codec
        self._selectors: dict[str, str] = {}
        if field_selector:
            self._selectors["fieldSelector"] = field_selector
        if label_selector:
            self._selectors["labelSelector"] = label_selector

    def __repr__(self) -> str:
        sel = ",".join(f"{k}={v}" for k, v in self._selectors.items())
        return f"{self.path}{'?' + sel if sel else ''}"

    async def list(
        self,
        *,
        limit: int,
        continue_: str,
        cached: Mapping[tuple[str, str], Item[V]] | None = None,
    ) -> tuple[list[Item[V]], str, str]:
        params = dict(self._selectors)
        params["limit"] = str(limit)
        if continue_:
            params["continue"] = continue_
        body = await self.client.request("GET", self.path, params=params)
        return self.codec.decode_list(body, cached)

    async def watch(self, *, resource_version: str, timeout: int) -> AsyncIterator[WatchEvent[V]]:
        params = dict(self._selectors)
        params.update(
            watch="true",
            allowWatchBookmarks="true",
            resourceVersion=resource_version,
            timeoutSeconds=str(timeout),
        )
        # The server ends the watch after `timeout`; a silent connection is dead well after.
        async for line in self.client.watch_lines(self.path, params, read_timeout=timeout + 30):
            yield self.codec.decode_event(line)

    async def get(self, namespace: str, name: str) -> Item[V] | None:
        base = self.path
        if namespace and "/namespaces/" not in base:
            prefix, _, plural = base.rpartition("/")
            base = f"{prefix}/namespaces/{namespace}/{plural}"
        body = await self.client.get(f"{base}/{name}")
        return None if body is None else self.codec.decode_object(body)
