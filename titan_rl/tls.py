"""Optional TLS on every channel and server, and optional mutual TLS: the token alone travels in plain text.

`security.tls_cert_file` / `tls_key_file` turn TLS on. Each process has one certificate: it serves
with it and, where a server asks, presents it as its client certificate, so a certificate meant for
mutual TLS must allow both uses (extended key usage serverAuth and clientAuth, or none). Clients
check servers against `tls_ca_file` (gRPC's bundled roots when empty); with `tls_client_auth`,
servers also demand a client certificate signed by that CA.

The files are read and checked once, when a service or the launcher starts (`load_tls`), so a
missing or misplaced file stops it with the key and path named; `use_tls` then makes the settings
this process's, for `titan_rl.rpc` to use. Rollout workers are processes of their own given the
config; they call `use_tls` themselves. Certificates are not reloaded: a renewed one takes a restart.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from titan_rl.config import SecurityConfig
from titan_rl.errors import ConfigError


@dataclass(frozen=True)
class TlsSettings:
    """PEM bytes read from the configured files."""

    cert_chain: bytes
    private_key: bytes
    root_certs: bytes | None
    """None: gRPC's bundled roots verify servers."""
    client_auth: bool


_current: TlsSettings | None = None
_KEYS = ("tls_cert_file", "tls_key_file", "tls_ca_file", "tls_client_auth")


def _read_pem(where: str, key: str, path: str, kind: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ConfigError(f"{where}: security.{key}={path!r} cannot be read: {e.strerror}") from e
    if b"-----BEGIN " not in data or f"{kind}-----".encode() not in data:
        raise ConfigError(f"{where}: security.{key}={path!r} holds no PEM {kind.lower()}")
    return data


def _check_key_fits(where: str, security: SecurityConfig) -> None:
    """gRPC reports a key that is not its certificate's only as a failure to bind the port: say so here instead."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(security.tls_cert_file, security.tls_key_file, password="")
    except ssl.SSLError as e:
        raise ConfigError(
            f"{where}: security.tls_key_file={security.tls_key_file!r} is not the unencrypted private key of "
            f"security.tls_cert_file={security.tls_cert_file!r} ({e.reason or e})"
        ) from e


def load_tls(security: SecurityConfig, where: str = "<config>") -> TlsSettings | None:
    """The TLS settings `security` names, read from disk; None when TLS is off.

    Raises ConfigError naming the key (and file) when a file is missing, unreadable or not PEM,
    when the private key is not the certificate's, or when a key needs another one that is empty.
    """
    s = security
    given = [key for key in _KEYS if getattr(s, key)]
    if not given:
        return None
    for key in ("tls_cert_file", "tls_key_file"):
        if not getattr(s, key):
            raise ConfigError(
                f"{where}: security.{given[0]} is set but security.{key} is empty: "
                "with TLS every service needs its own certificate and private key (PEM files)"
            )
    if s.tls_client_auth and not s.tls_ca_file:
        raise ConfigError(f"{where}: security.tls_client_auth=true needs security.tls_ca_file, the CA that signs client certificates")
    settings = TlsSettings(
        cert_chain=_read_pem(where, "tls_cert_file", s.tls_cert_file, "CERTIFICATE"),
        private_key=_read_pem(where, "tls_key_file", s.tls_key_file, "PRIVATE KEY"),
        root_certs=_read_pem(where, "tls_ca_file", s.tls_ca_file, "CERTIFICATE") if s.tls_ca_file else None,
        client_auth=s.tls_client_auth,
    )
    _check_key_fits(where, s)
    return settings


def use_tls(settings: TlsSettings | None) -> None:
    """Make `settings` the TLS (None: plaintext) of every server and channel this process makes from now on."""
    global _current
    _current = settings


def current_tls() -> TlsSettings | None:
    return _current


def server_credentials(settings: TlsSettings) -> grpc.ServerCredentials:
    """Serve with this process's certificate; with client_auth, refuse clients without one signed by the CA."""
    return grpc.ssl_server_credentials(
        [(settings.private_key, settings.cert_chain)],
        root_certificates=settings.root_certs if settings.client_auth else None,
        require_client_auth=settings.client_auth,
    )


def channel_credentials(settings: TlsSettings) -> grpc.ChannelCredentials:
    """Verify the server against the CA and offer this process's certificate to servers that ask for one."""
    return grpc.ssl_channel_credentials(
        root_certificates=settings.root_certs, private_key=settings.private_key, certificate_chain=settings.cert_chain
    )
