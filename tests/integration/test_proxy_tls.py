"""The proxy behind an ``ssl:`` listener, as browsers and curl reach it (SPEC 3, 4.1)."""

from __future__ import annotations

import datetime

import pytest
import pytest_twisted
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from twisted.internet import reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, wrapClientTLS
from twisted.internet.protocol import Factory
from twisted.internet.ssl import Certificate, optionsForClientTLS

from tests.integration.harness import LOOPBACK, RawClient, equalizer_config, parse_response, within

pytestmark = pytest.mark.usefixtures("no_logged_errors")


def self_signed(directory) -> tuple[str, str, bytes]:
    """A key file, a certificate file for ``localhost`` and the certificate's PEM."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder().subject_name(name).issuer_name(name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    cert_path.write_bytes(pem)
    return str(key_path), str(cert_path), pem


@pytest_twisted.ensureDeferred
async def test_tls_client_offering_alpn_is_served_over_http_1_1(backends, equalizer, tmp_path):
    """A TLS client that offers h2 and http/1.1 over ALPN (as browsers and curl do) gets
    http/1.1 and its answer, and the backend sees ``X-Forwarded-Proto: https``."""
    backend = backends("b1")
    key, cert, pem = self_signed(tmp_path)
    listen = f"ssl:0:interface={LOOPBACK}:privateKey={key}:certKey={cert}"
    balancer = await equalizer(equalizer_config([backend.url], proxy={"listen": listen}))
    options = optionsForClientTLS("localhost", trustRoot=Certificate.loadPEM(pem),
                                  acceptableProtocols=[b"h2", b"http/1.1"])
    endpoint = wrapClientTLS(options, TCP4ClientEndpoint(reactor, LOOPBACK, balancer.proxy_port))
    client = await within(endpoint.connect(Factory.forProtocol(RawClient)))
    client.send(b"GET /secure HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
    response = parse_response(await client.wait_closed())
    assert response.status == 200
    assert client.transport.negotiatedProtocol == b"http/1.1"
    assert backend.requests[-1].header(b"x-forwarded-proto") == [b"https"]
