"""TLS and mutual TLS (titan_rl.tls) on a real buffer service, with certificates made for each test session."""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.helpers import make_config, transitions
from titan_rl.auth import TOKEN_ENV
from titan_rl.clients.buffer import BufferClient, ChunkSender
from titan_rl.config import SecurityConfig
from titan_rl.errors import ConfigError
from titan_rl.rpc import is_serving, make_channel
from titan_rl.tls import load_tls, use_tls
from titan_rl.v1 import buffer_pb2, buffer_pb2_grpc

LOOPBACK = ipaddress.ip_address("127.0.0.1")
Issuer = tuple[x509.Certificate, ec.EllipticCurvePrivateKey]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _issue(directory: Path, stem: str, issuer: Issuer | None) -> Issuer:
    """Write <stem>.pem and <stem>.key: a CA when `issuer` is None, else a cert for localhost/127.0.0.1 signed by it."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(stem))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if issuer is None:
        builder = builder.issuer_name(_name(stem)).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        signer = key
    else:
        builder = (
            builder.issuer_name(issuer[0].subject)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(LOOPBACK)]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        )
        signer = issuer[1]
    cert = builder.sign(signer, hashes.SHA256())
    (directory / f"{stem}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    pkcs8 = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    (directory / f"{stem}.key").write_bytes(pkcs8)
    return cert, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Path:
    """ca.pem signs node.pem (this run's services); rogue-ca.pem signs rogue.pem, trusted by nobody."""
    directory = tmp_path_factory.mktemp("pki")
    ca = _issue(directory, "ca", None)
    _issue(directory, "node", ca)
    rogue_ca = _issue(directory, "rogue-ca", None)
    _issue(directory, "rogue", rogue_ca)
    return directory


def security(pki: Path, ca: str = "ca", node: str = "node", client_auth: bool = False) -> SecurityConfig:
    return SecurityConfig(
        tls_cert_file=str(pki / f"{node}.pem"),
        tls_key_file=str(pki / f"{node}.key"),
        tls_ca_file=str(pki / f"{ca}.pem"),
        tls_client_auth=client_auth,
    )


@pytest.fixture(autouse=True)
def plaintext_afterwards():
    """Every test leaves this process as it found it: without TLS settings."""
    yield
    use_tls(None)


@pytest.fixture
def serve(pki):
    """Starts real buffer services with the given SecurityConfig; yields a function returning each one's address."""
    from titan_rl.buffer.process import start

    started = []

    def start_with(settings: SecurityConfig) -> str:
        use_tls(load_tls(settings))
        server, port, tables = start(make_config("buffer_server.port=0", "train.min_buffer_size=64"))
        started.append((server, tables))
        return f"127.0.0.1:{port}"

    yield start_with
    for server, tables in started:
        for table in tables.values():
            table.close()
        server.stop(grace=None).wait()


def info_code(channel: grpc.Channel) -> grpc.StatusCode:
    """The status of one Info call on `channel` (OK when it succeeds)."""
    try:
        buffer_pb2_grpc.BufferServiceStub(channel).Info(buffer_pb2.InfoRequest(), timeout=5)
    except grpc.RpcError as e:
        return e.code()
    finally:
        channel.close()
    return grpc.StatusCode.OK


def send_and_count(address: str, n: int) -> int:
    """Send n transitions with this process's channels (ChunkSender) and read the buffer's insert count back."""
    sender = ChunkSender(address)
    assert sender.send(transitions(n), worker_id=0, policy_version=0) and sender.flush(5.0)
    sender.close()
    client = BufferClient(address)
    try:
        return client.info().inserts_total
    finally:
        client.close()


def test_a_tls_server_refuses_plaintext_and_serves_clients_that_trust_its_ca(serve, pki):
    address = serve(security(pki))
    assert info_code(grpc.insecure_channel(address)) == grpc.StatusCode.UNAVAILABLE
    assert send_and_count(address, 7) == 7  # this process's settings trust ca.pem
    assert is_serving(address)  # the launcher's health check speaks TLS too
    use_tls(None)
    assert not is_serving(address)


def test_a_client_that_trusts_another_ca_is_refused(serve, pki):
    address = serve(security(pki))
    use_tls(load_tls(security(pki, ca="rogue-ca")))
    assert info_code(make_channel(address)) == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_lets_in_only_clients_with_a_certificate_from_the_ca(serve, pki):
    address = serve(security(pki, client_auth=True))
    trust_only = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    assert info_code(grpc.secure_channel(address, trust_only)) == grpc.StatusCode.UNAVAILABLE
    use_tls(load_tls(security(pki, node="rogue")))  # trusts the server, but its certificate comes from rogue-ca
    assert info_code(make_channel(address)) == grpc.StatusCode.UNAVAILABLE
    use_tls(load_tls(security(pki)))
    assert send_and_count(address, 5) == 5


def test_tls_and_the_token_are_both_required(serve, pki, monkeypatch):
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    address = serve(security(pki))
    trusting = grpc.ssl_channel_credentials(root_certificates=(pki / "ca.pem").read_bytes())
    assert info_code(grpc.secure_channel(address, trusting)) == grpc.StatusCode.UNAUTHENTICATED
    assert info_code(make_channel(address)) == grpc.StatusCode.OK  # TLS settings and token of this process


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"tls_key_file": ""}, "security.tls_cert_file is set but security.tls_key_file is empty"),
        ({"tls_cert_file": "missing.pem"}, "security.tls_cert_file='missing.pem' cannot be read"),
        ({"tls_cert_file": "{pki}/node.key"}, "security.tls_cert_file='{pki}/node.key' holds no PEM certificate"),
        ({"tls_key_file": "{pki}/rogue.key"}, "security.tls_key_file='{pki}/rogue.key' is not the unencrypted private key of"),
        ({"tls_ca_file": ""}, "security.tls_client_auth=true needs security.tls_ca_file"),
    ],
)
def test_tls_mistakes_are_config_errors_naming_the_key(pki, overrides, named):
    settings = dataclasses.replace(security(pki, client_auth=True), **{key: value.format(pki=pki) for key, value in overrides.items()})
    with pytest.raises(ConfigError) as e:
        load_tls(settings, "cluster.yaml")
    assert str(e.value).startswith("cluster.yaml: " + named.format(pki=pki))


def test_a_launch_with_a_missing_tls_file_stops_before_any_service_starts(pki):
    from titan_rl.launcher import Launcher

    with pytest.raises(ConfigError, match=r"security\.tls_key_file='nowhere\.key' cannot be read"):
        Launcher("config/cartpole.yaml", [f"security.tls_cert_file={pki / 'node.pem'}", "security.tls_key_file=nowhere.key"])
