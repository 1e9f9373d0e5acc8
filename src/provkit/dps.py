"""The DPS service adapter: the one module that imports azure-iot-deviceprovisioning (its aio client).

``DpsEnrollments(config)`` implements ``provkit.cloud.EnrollmentPort`` and adds ``get_registration``,
``get_group`` and ``put_group`` (group mode's enrollment group, ``provkit.cloud.EnrollmentGroup``).
Open it inside the event loop that uses it (``await DpsEnrollments.open(config)``) and ``await .close()``.

- Authentication: the DPS service connection string (SAS, policy ``provisioningserviceowner``).
- Trust: ``config.ca_file`` (the emulator's CA) or the system roots.
- Throttling and outages: the SDK's retry policy honours ``Retry-After`` on 429/503 with a capped
  exponential backoff (``retry_total``, ``retry_backoff_max``); after that a 429/5xx or a connection
  failure becomes ``CloudUnavailable`` (with ``retry_after`` when the service said).
- azure-core's per-request HTTP log is turned down to WARNING (it logs every call at INFO).
- HTTP statuses map to ``CloudNotFound`` (404), ``CloudAlreadyExists`` (409), ``CloudEtagMismatch`` (412),
  ``CloudRejected`` (other 4xx); a bulk operation's per-record error codes (409xxx etc.) the same way.
- Each SDK call runs inside ``provkit.cloud_calls.CallObserver.call`` (a span, a latency, an outcome);
  every 429 answer the SDK sees (its retries too) is counted by a pipeline policy placed after the retry
  policy (``_additional_pipeline_policies``, which this pinned SDK version reads).
- The request pipeline is the SDK's own, without the policies that only cost time here
  (``_DpsClient``): user agent, SAS authorisation, headers, retry and the HTTP log as the SDK builds
  them, in its order; left out are the second user-agent policy (it never changes the header the first
  set), the content-decode policy (it parses every JSON body into a context entry only long-running
  operations read; this client's operations parse the body themselves), azure-core's HTTP tracing
  span (the suite does not configure azure-core tracing: its spans are CallObserver's) and the network
  trace log (off unless ``logging_enable``, which the adapter never sets).
- A shared-key SAS token (the SDK signs one per request, valid an hour) is reused for
  ``SAS_REUSE_SECONDS`` (every request still carries a token valid for at least ten more minutes):
  ``_ReusedSasPolicy``; an HMAC and the token's URL-encoding per call saved.
- The ports take and return ``provkit.cloud.Enrollment``; the JSON is ``provkit.dps_json``'s business.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import aiohttp
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline import AsyncPipeline, PipelineRequest, PipelineResponse
from azure.core.pipeline.policies import (
    AsyncRetryPolicy,
    HeadersPolicy,
    HttpLoggingPolicy,
    SansIOHTTPPolicy,
    UserAgentPolicy,
)
from azure.core.pipeline.transport import AioHttpTransport, AsyncHttpResponse, HttpRequest
from azure.iot.deviceprovisioning import __version__ as SDK_VERSION
from azure.iot.deviceprovisioning._auth import SharedKeyCredentialPolicy
from azure.iot.deviceprovisioning.aio import DeviceProvisioningClient

from provkit.cloud import (
    BulkItemError,
    CloudAlreadyExists,
    CloudError,
    CloudEtagMismatch,
    CloudNotFound,
    CloudRejected,
    CloudUnavailable,
    DpsConfig,
    Enrollment,
    EnrollmentGroup,
    RegistrationState,
)
from provkit.cloud_calls import CallObserver
from provkit.dps_json import (
    bulk_errors_from_json,
    enrollment_from_json,
    enrollment_group_from_json,
    enrollment_group_to_json,
    enrollment_to_json,
    registration_state_from_json,
)

MAX_BULK = 10
# The SDK's shared-key tokens are valid for an hour (``generate_sas_token``'s default expiry): one is reused
# for 50 minutes, so none is sent with less than 10 minutes left.
SAS_REUSE_SECONDS = 50 * 60
# azure-core logs every request and response at INFO; keep our logs readable (warnings still show).
_SDK_HTTP_LOG = "azure.core.pipeline.policies.http_logging_policy"


def _retry_after(exc: HttpResponseError) -> float | None:
    # azure-core types the error's response as a protocol without headers; every real response has them.
    headers = getattr(exc.response, "headers", None)
    if not isinstance(headers, Mapping):
        return None
    for header in ("retry-after-ms", "x-ms-retry-after-ms"):
        value = headers.get(header)
        if value:
            try:
                return float(value) / 1000
            except ValueError:
                pass
    value = headers.get("retry-after")
    if value:
        try:
            return float(value)
        except ValueError:
            return None
    return None


def translate(exc: AzureError, what: str) -> CloudError:
    """One place that turns the SDK's exceptions into ours."""
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return CloudUnavailable(f"{what}: DPS unreachable ({type(exc).__name__})")
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        message = f"{what}: DPS answered {status}"
        if status == 404:
            return CloudNotFound(message, status=status)
        if status == 409:
            return CloudAlreadyExists(message, status=status)
        if status == 412:
            return CloudEtagMismatch(message, status=status)
        if status == 429 or status >= 500:
            return CloudUnavailable(message, status=status, retry_after=_retry_after(exc))
        return CloudRejected(message, status=status)
    return CloudUnavailable(f"{what}: {type(exc).__name__}")


class _ThrottleCounter(SansIOHTTPPolicy[HttpRequest, AsyncHttpResponse]):
    """Counts each 429 answer, the SDK's own retries included."""

    def __init__(self, observer: CallObserver) -> None:
        super().__init__()
        self._observer = observer

    def on_response(
        self,
        request: PipelineRequest[HttpRequest],
        response: PipelineResponse[HttpRequest, AsyncHttpResponse],
    ) -> None:
        if response.http_response.status_code == 429:
            self._observer.throttled()


class _ReusedSasPolicy(SharedKeyCredentialPolicy):
    """The SDK's shared-key policy, its token reused for ``SAS_REUSE_SECONDS`` instead of signed anew for
    every request.  ``monotonic``: the clock the reuse is timed by (tests move it)."""

    def __init__(
        self, endpoint: str, policy_name: str, key: str, monotonic: Callable[[], float] = time.monotonic
    ) -> None:
        super().__init__(endpoint, policy_name, key)
        self._monotonic = monotonic
        self._token: str | None = None
        self._renew_at = 0.0

    def on_request(self, request: PipelineRequest[HttpRequest]) -> None:
        now = self._monotonic()
        if self._token is None or now >= self._renew_at:
            self._add_authorization_header(request)  # a new token, as the SDK signs it
            self._token = request.http_request.headers["Authorization"]
            self._renew_at = now + SAS_REUSE_SECONDS
        else:
            request.http_request.headers["Authorization"] = self._token


class _DpsClient(DeviceProvisioningClient):
    """Microsoft's client, its pipeline without the policies that do nothing useful here (see the module's
    description).  Per call this saves the parse of every response body a second time, a tracing-settings
    lookup and two policy hops each way."""

    def _create_pipeline(self, credential: Any, base_url: str, **kwargs: Any) -> AsyncPipeline[Any, Any]:
        super()._create_pipeline(credential, base_url, **kwargs)  # chooses the SAS policy for the credential
        signing: object = self._credential_policy
        if type(signing) is SharedKeyCredentialPolicy:  # a connection string's key: its tokens reused
            reused = _ReusedSasPolicy(signing.endpoint, signing.policy_name, signing.key)
            self._credential_policy = reused  # type: ignore[assignment]  # (the SDK types it as its own)
        extra = kwargs.get("_additional_pipeline_policies")
        policies = [
            kwargs.get("user_agent_policy")
            or UserAgentPolicy(sdk_moniker=f"az-iot-dps-python/{SDK_VERSION}", **kwargs),
            self._credential_policy,
            HeadersPolicy(**kwargs),
            AsyncRetryPolicy(**kwargs),
            HttpLoggingPolicy(**kwargs),
            *([extra] if extra else []),
        ]
        return AsyncPipeline(kwargs.get("transport") or AioHttpTransport(**kwargs), policies=policies)


class DpsEnrollments:
    """Individual enrollments and registration states of one DPS instance."""

    def __init__(
        self,
        client: DeviceProvisioningClient,
        session: aiohttp.ClientSession,
        observer: CallObserver | None = None,
    ) -> None:
        self._client = client
        self._session = session
        self._observer = observer or CallObserver("dps")

    @classmethod
    async def open(
        cls, config: DpsConfig, *, pool_size: int = 8, observer: CallObserver | None = None
    ) -> DpsEnrollments:
        """One aiohttp session (keep-alive) for every call.  ``pool_size`` caps the open connections: more
        requests than that wait for a free connection instead of paying a new TLS handshake on both sides
        (the service is one event loop; a few connections already keep it busy)."""
        logging.getLogger(_SDK_HTTP_LOG).setLevel(logging.WARNING)
        context = ssl.create_default_context(cafile=str(config.ca_file) if config.ca_file else None)
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=context, limit=pool_size),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.timeout_seconds),
        )
        transport = AioHttpTransport(session=session, session_owner=False)
        observer = observer or CallObserver("dps")
        client = _DpsClient.from_connection_string(
            config.connection_string.reveal(),
            transport=transport,
            retry_total=config.retry_total,
            retry_connect=min(config.retry_total, 1),
            retry_backoff_factor=0.2,
            retry_backoff_max=config.retry_backoff_max,
            connection_timeout=config.timeout_seconds,
            # after the retry policy: sees every attempt (this SDK's pipeline has no raw_response_hook)
            _additional_pipeline_policies=_ThrottleCounter(observer),
        )
        return cls(client, session, observer)

    async def close(self) -> None:
        await self._client.close()
        await self._session.close()

    async def get(self, registration_id: str) -> Enrollment | None:
        async with self._observer.call("get_enrollment"):
            try:
                body = await self._client.enrollment.get(id=registration_id)
            except HttpResponseError as exc:
                if exc.status_code == 404:
                    return None
                raise translate(exc, "get enrollment") from exc
            except AzureError as exc:
                raise translate(exc, "get enrollment") from exc
        return enrollment_from_json(body, registration_id)

    async def create(self, enrollment: Enrollment) -> Enrollment:
        async with self._observer.call("create_enrollment"):
            try:
                created = await self._client.enrollment.create_or_update(
                    id=enrollment.registration_id, enrollment=enrollment_to_json(enrollment)
                )
            except AzureError as exc:
                raise translate(exc, "create enrollment") from exc
        return enrollment_from_json(created, enrollment.registration_id)

    async def update(self, enrollment: Enrollment) -> Enrollment:
        async with self._observer.call("update_enrollment"):
            try:
                updated = await self._client.enrollment.create_or_update(
                    id=enrollment.registration_id,
                    enrollment=enrollment_to_json(enrollment),
                    if_match=enrollment.etag or "*",
                )
            except AzureError as exc:
                raise translate(exc, "update enrollment") from exc
        return enrollment_from_json(updated, enrollment.registration_id)

    async def bulk_create(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        return await self._bulk("create", [enrollment_to_json(e) for e in enrollments])

    async def bulk_update(self, enrollments: Sequence[Enrollment]) -> list[BulkItemError]:
        records = [dict(enrollment_to_json(e), etag=e.etag or "*") for e in enrollments]
        return await self._bulk("updateIfMatchETag", records)

    async def _bulk(self, mode: str, records: list[dict[str, Any]]) -> list[BulkItemError]:
        if not records:
            return []
        if len(records) > MAX_BULK:
            raise ValueError(f"a DPS bulk operation takes at most {MAX_BULK} enrollments")
        name = "bulk_create" if mode == "create" else "bulk_update"
        async with self._observer.call(f"{name}_enrollments"):
            try:
                result = await self._client.enrollment.run_bulk_operation(
                    bulk_operation={"mode": mode, "enrollments": records}
                )
            except AzureError as exc:
                raise translate(exc, name.replace("_", " ") + " enrollments") from exc
        return bulk_errors_from_json(result)

    async def get_group(self, group_id: str) -> EnrollmentGroup | None:
        async with self._observer.call("get_enrollment_group"):
            try:
                body = await self._client.enrollment_group.get(id=group_id)
            except HttpResponseError as exc:
                if exc.status_code == 404:
                    return None
                raise translate(exc, "get enrollment group") from exc
            except AzureError as exc:
                raise translate(exc, "get enrollment group") from exc
        return enrollment_group_from_json(body)

    async def put_group(self, group: EnrollmentGroup) -> EnrollmentGroup:
        """Create (``group.etag`` None) or replace the group if its etag still is ``group.etag``."""
        async with self._observer.call("put_enrollment_group"):
            try:
                written = await self._client.enrollment_group.create_or_update(
                    id=group.group_id,
                    enrollment_group=enrollment_group_to_json(group),
                    **({"if_match": group.etag} if group.etag else {}),
                )
            except AzureError as exc:
                raise translate(exc, "write enrollment group") from exc
        return enrollment_group_from_json(written)

    async def get_registration(self, registration_id: str) -> RegistrationState | None:
        async with self._observer.call("get_registration"):
            try:
                body = await self._client.device_registration_state.get(id=registration_id)
            except HttpResponseError as exc:
                if exc.status_code == 404:
                    return None
                raise translate(exc, "get registration state") from exc
            except AzureError as exc:
                raise translate(exc, "get registration state") from exc
        return registration_state_from_json(body or {})
