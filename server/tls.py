"""Transport security: server credentials that follow certificate rotation, client credentials
for agents and pulsectl, and the agent identity carried by a client certificate.

An agent's identity comes only from its verified certificate: the id at the end of a URI SAN
`spiffe://<trust-domain>/agent/<id>` (gRPC exposes URI SANs as the `peer_uri` auth-context
property), or the subject's common name when the certificate has no URI SAN.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import grpc

log = logging.getLogger(__name__)

AGENT_PATH_PREFIX = "/agent/"


@dataclass(frozen=True)
class ServerTls:
    cert: Path
    key: Path
    client_ca: Path | None = None  # set: mTLS, every client must present a certificate

    @property
    def mutual(self) -> bool:
        return self.client_ca is not None


class RotatingCertificates:
    """A certificate-config fetcher for `grpc.dynamic_ssl_server_credentials`: gRPC calls it
    before new handshakes; it re-reads the files when any of them changed on disk, so rotating
    certificates (or the client CA) needs no restart. An unreadable set, or a certificate and key
    that do not match (one file replaced, the other not yet), keeps the previous configuration
    until the files are consistent again."""

    def __init__(self, tls: ServerTls) -> None:
        self._tls = tls
        self._stamp = self._mtimes()
        self.initial = self._load()
        self.reloads = 0

    def _paths(self) -> list[Path]:
        return [p for p in (self._tls.cert, self._tls.key, self._tls.client_ca) if p is not None]

    def _mtimes(self) -> tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in self._paths())

    def _load(self) -> grpc.ServerCertificateConfiguration:
        tls = self._tls
        cert, key = tls.cert.read_bytes(), tls.key.read_bytes()
        if not key_matches_certificate(key, cert):
            raise ValueError(f"{tls.key} is not the key of {tls.cert}")
        return grpc.ssl_server_certificate_configuration(
            [(key, cert)],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
        )

    def __call__(self) -> grpc.ServerCertificateConfiguration | None:
        try:
            stamp = self._mtimes()
            if stamp == self._stamp:
                return None
            config = self._load()
        except (OSError, ValueError) as exc:
            log.warning("TLS files changed but cannot be read (%s); keeping the previous ones", exc)
            return None
        self._stamp = stamp
        self.reloads += 1
        log.info("TLS certificate files changed on disk: new handshakes use them")
        return config


def key_matches_certificate(key_pem: bytes, cert_pem: bytes) -> bool:
    """True when the private key belongs to the first certificate of the chain."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem)
    key = serialization.load_pem_private_key(key_pem, password=None)
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return bool(
        key.public_key().public_bytes(der, spki) == cert.public_key().public_bytes(der, spki)
    )


def server_credentials(tls: ServerTls) -> tuple[grpc.ServerCredentials, RotatingCertificates]:
    fetcher = RotatingCertificates(tls)
    credentials = grpc.dynamic_ssl_server_credentials(
        fetcher.initial, fetcher, require_client_authentication=tls.mutual
    )
    return credentials, fetcher


@dataclass(frozen=True)
class ClientTls:
    """Client side: trust `ca` (None: the system roots); present `cert`/`key` for mTLS."""

    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ValueError("--cert and --key go together")

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes() if self.ca else None,
            private_key=self.key.read_bytes() if self.key else None,
            certificate_chain=self.cert.read_bytes() if self.cert else None,
        )

    def stamp(self) -> tuple[int, ...]:
        """Modification times of the files: a change means new credentials to load."""
        paths = (self.ca, self.cert, self.key)
        return tuple(os.stat(p).st_mtime_ns for p in paths if p is not None)


def agent_id_from_uris(uris: Iterable[str]) -> str | None:
    """The id of the first `spiffe://<trust-domain>/agent/<id>` URI, if any."""
    for uri in uris:
        parsed = urlparse(uri)
        if parsed.scheme == "spiffe" and parsed.path.startswith(AGENT_PATH_PREFIX):
            agent_id = parsed.path[len(AGENT_PATH_PREFIX) :]
            if agent_id and "/" not in agent_id:
                return agent_id
    return None


def peer_agent_id(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The agent identity of a verified client certificate; None without one (no mTLS), or when
    the certificate names no agent (URI SANs but none of the agent form)."""
    if b"ssl" not in list(auth_context.get("transport_security_type", [])):
        return None
    uris = [v.decode(errors="replace") for v in auth_context.get("peer_uri", [])]
    if uris:
        return agent_id_from_uris(uris)
    names = [v.decode(errors="replace") for v in auth_context.get("x509_common_name", [])]
    return names[0] if names else None


def certificate_agent_id(cert_pem: bytes) -> str | None:
    """Read the agent identity from the agent's own certificate (same rule as the server)."""
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if uris:
        return agent_id_from_uris(uris)
    names = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
