"""Optional mTLS on the worker plane (router <-> workers, decode -> prefill).

One set of files per process: ``--tls-cert`` / ``--tls-key`` (this process's certificate, used
both to serve and as the client certificate on its own calls) and ``--tls-ca`` (the CA that signs
every peer). With a CA the server requires a client certificate signed by it, so a pod that can
reach a worker port but holds no certificate is refused at the handshake. The operator mounts the
files from a Secret of type kubernetes.io/tls plus ``ca.crt`` (``spec.tls.secretName``).
``--tls-server-name`` overrides the name checked in the peer's certificate, for certificates
issued to one service name rather than to every pod.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import grpc

from moeserve.common.errors import ConfigError

__all__ = ["TlsConfig", "add_tls_arguments", "tls_from_args", "add_port", "open_channel"]


@dataclass(frozen=True)
class TlsConfig:
    cert: bytes
    key: bytes
    ca: bytes | None = None
    server_name: str | None = None

    @classmethod
    def from_files(cls, cert: str, key: str, ca: str | None = None,
                   server_name: str | None = None) -> TlsConfig:  # fmt: skip
        def read(path: str, flag: str) -> bytes:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise ConfigError(f"{flag} {path}: {e.strerror}") from None
            if b"-----BEGIN" not in data:
                raise ConfigError(f"{flag} {path} is not a PEM file")
            return data

        return cls(read(cert, "--tls-cert"), read(key, "--tls-key"),
                   read(ca, "--tls-ca") if ca else None, server_name)  # fmt: skip

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca,
            require_client_auth=self.ca is not None,
        )  # fmt: skip

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def channel_options(self) -> list[tuple[str, str]]:
        if self.server_name:
            return [("grpc.ssl_target_name_override", self.server_name)]
        return []


def add_tls_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("worker-plane mTLS (all off when --tls-cert is unset)")
    g.add_argument("--tls-cert", default=None, help="PEM certificate of this process")
    g.add_argument("--tls-key", default=None, help="PEM private key of --tls-cert")
    g.add_argument("--tls-ca", default=None,
                   help="PEM CA of the peers; when set, peers must present a certificate")
    g.add_argument("--tls-server-name", default=None,
                   help="name expected in the peers' certificates (default: the address's host)")


def tls_from_args(args: argparse.Namespace) -> TlsConfig | None:
    cert, key = getattr(args, "tls_cert", None), getattr(args, "tls_key", None)
    ca = getattr(args, "tls_ca", None)
    if not cert and not key and not ca:
        return None
    if not cert or not key:
        raise ConfigError("--tls-cert and --tls-key go together")
    return TlsConfig.from_files(cert, key, ca, getattr(args, "tls_server_name", None))


def add_port(server: grpc.aio.Server, address: str, tls: TlsConfig | None) -> int:
    if tls is None:
        return server.add_insecure_port(address)
    return server.add_secure_port(address, tls.server_credentials())


def open_channel(address: str, tls: TlsConfig | None,
                 options: list[tuple[str, object]] | None = None,
                 interceptors: list[grpc.aio.ClientInterceptor] | None = None,
                 ) -> grpc.aio.Channel:  # fmt: skip
    """``interceptors``: e.g. moeserve.common.worker_auth.client_interceptors (the token)."""
    opts = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts, interceptors=interceptors)
    return grpc.aio.secure_channel(address, tls.channel_credentials(),
                                   options=opts + tls.channel_options(),
                                   interceptors=interceptors)  # fmt: skip
