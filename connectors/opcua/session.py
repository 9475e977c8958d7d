"""Opening and closing asyncua sessions the way the connector and ``discover`` need them.

asyncua is imported here at module level; this module is only imported when a device is
built or ``discover`` runs, never by ``plantbus check``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from asyncua import Client, ua
from asyncua.crypto import security_policies, uacrypto
from cryptography.hazmat.primitives import serialization

from plantbus.connectors.opcua.security import ClientIdentity, SecurityError, check_trusted

__all__ = [
    "SESSION_TIMEOUT",
    "close",
    "drop",
    "open_session",
    "quiet_library_logs",
    "status_name",
]

SESSION_TIMEOUT = 120.0
"""Seconds the server keeps a session of ours whose connection broke (then it frees it)."""

_MODES = {
    "Sign": ua.MessageSecurityMode.Sign,
    "SignAndEncrypt": ua.MessageSecurityMode.SignAndEncrypt,
}


def status_name(code: int) -> str:
    """``BadNodeIdUnknown (0x80340000)``: a status code as messages show it."""
    try:
        name = ua.StatusCode(code).name
    except Exception:  # an unknown code: asyncua's lookup raises
        name = "status"
    return f"{name} (0x{code:08X})"


def quiet_library_logs() -> None:
    """Hide asyncua's own log lines unless plantbus logs at debug level.

    The connector reports every fault itself in one line (connect failures, lost
    connections, Bad points); asyncua would add its own warnings and tracebacks for the same
    events (a server restart logs a publish-loop traceback), which only repeat them.
    """
    lib = logging.getLogger("asyncua")
    if lib.level == logging.NOTSET and not logging.getLogger().isEnabledFor(logging.DEBUG):
        lib.setLevel(logging.CRITICAL)


def _policy_class(name: str) -> type[security_policies.SecurityPolicy]:
    # the config spells policies as their URIs do (Aes128_Sha256_RsaOaep), asyncua's classes
    # without the underscores
    cls: type[security_policies.SecurityPolicy] = getattr(
        security_policies, "SecurityPolicy" + name.replace("_", "")
    )
    return cls


async def _secure(client: Client, identity: ClientIdentity) -> str:
    """Check the server's certificate against the trust list, then set up message security."""
    policy = _policy_class(identity.policy)
    mode = _MODES[identity.mode]
    endpoints = await client.connect_and_get_server_endpoints()
    chosen = next(
        (e for e in endpoints if e.SecurityMode == mode and e.SecurityPolicyUri == policy.URI),
        None,
    )
    if chosen is None:
        offered = sorted(
            {f"{e.SecurityPolicyUri.rsplit('#', 1)[-1]}/{e.SecurityMode.name}" for e in endpoints}
        )
        raise SecurityError(
            f"the server offers no {identity.policy}/{identity.mode} endpoint "
            f"(it offers: {', '.join(offered) or 'none'})"
        )
    cert = uacrypto.x509_from_der(chosen.ServerCertificate)
    if cert is None:
        raise SecurityError("the server's endpoint has no certificate")
    der = cert.public_bytes(serialization.Encoding.DER)
    check_trusted(der, identity.trusted)
    await client.set_security(
        policy,
        certificate=uacrypto.CertProperties(identity.certificate, "der"),
        private_key=uacrypto.CertProperties(identity.private_key, "pem"),
        server_certificate=uacrypto.CertProperties(der, "der"),
        mode=mode,
    )
    return f"{identity.policy}/{identity.mode}"


async def open_session(
    url: str,
    *,
    request_timeout: float,
    client_name: str,
    username: str | None = None,
    password: str | None = None,
    identity: ClientIdentity | None = None,
    on_lost: Callable[[Exception], Awaitable[None]] | None = None,
) -> Client:
    """Connect to ``url`` and activate a session; raise if that fails within 2 × the timeout.

    Args:
        url: ``opc.tcp://…``.
        request_timeout: seconds for each request (connecting takes several).
        client_name: the session's client name as the server shows it.
        username / password: user authentication (anonymous without).
        identity: message security (none without); the server certificate is checked first.
        on_lost: called by asyncua's watchdog when it finds the connection broken or the
            server not answering (it probes the server every ``request_timeout``).

    Raises:
        SecurityError: the server's certificate is not trusted, or no endpoint matches.
        TimeoutError: no complete answer in time.
        OSError, asyncua errors: the connection or the session was refused.
    """
    timeout = request_timeout
    client = Client(url, timeout=timeout, watchdog_intervall=timeout)
    client.name = client.description = client_name
    client.application_uri = identity.application_uri if identity else "urn:plantbus:client"
    client.product_uri = "urn:plantbus"
    client.session_timeout = int(SESSION_TIMEOUT * 1000)
    if username is not None:
        client.set_user(username)
        client.set_password(password or "")

    async def connect() -> None:
        if identity is not None:
            await _secure(client, identity)
        if on_lost is not None:
            client.connection_lost_callback = on_lost
        await client.connect()

    try:
        # asyncio.timeout rather than wait_for, which on Python 3.11 can swallow a
        # cancellation that arrives just as the connect completes
        async with asyncio.timeout(2 * timeout):
            await connect()
    except TimeoutError:
        await drop(client)
        raise TimeoutError(f"no answer within {2 * timeout:g}s while connecting") from None
    except BaseException:
        await drop(client)
        raise
    return client


async def drop(client: Client) -> None:
    """Abandon ``client``'s connection without another word to the server (after a fault).

    asyncua has no public "abort": ``disconnect()`` first sends CloseSession, which a hung
    server never answers. Closing the socket first makes it skip the wire; cancelling the
    publish loop before that keeps it from retrying on the closed socket.
    """
    publish = getattr(client.uaclient, "_publish_task", None)
    if publish is not None:
        publish.cancel()
    client.disconnect_socket()
    with contextlib.suppress(Exception):
        # with the socket gone this only stops asyncua's watchdog and renewal tasks
        await client.disconnect()


async def close(client: Client, grace: float) -> None:
    """Close the session and the channel politely within ``grace`` seconds, else drop them."""
    try:
        async with asyncio.timeout(grace):
            await client.disconnect()
    except Exception:
        await drop(client)
