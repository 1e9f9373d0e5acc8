"""The CRL's URL in the certificates: with ``crl.url`` set, every leaf the factory mints (a CSR, a key made
here, a lot of either) names it in a CRL Distribution Points extension; fetching that URL from a
certificate gives a CRL signed by the issuing CA that lists the certificate once it is revoked."""

from __future__ import annotations

import asyncio
import urllib.request
from dataclasses import replace
from pathlib import Path

import pytest
from cryptography import x509
from factory_env import factory_settings, make_csr, make_key, running_factory
from support.emulator import free_port
from test_lots import _csr_lot, _send

from devprov.v1 import factory_service_pb2 as pb
from factory_svc.mint.service import MintPolicy
from factory_svc.revocation.crl import DER_NAME, CrlSettings
from factory_svc.settings import load_settings
from provkit.settings import SettingsError


def _leaf(chain_pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificates(chain_pem.encode())[0]


def _crl_urls(cert: x509.Certificate) -> list[str]:
    points = cert.extensions.get_extension_for_class(x509.CRLDistributionPoints)
    assert not points.critical
    return [name.value for point in points.value for name in point.full_name or ()]


async def _fetch_crl(url: str) -> x509.CertificateRevocationList:
    def get() -> bytes:
        with urllib.request.urlopen(url, timeout=10) as reply:  # loopback only
            assert reply.headers["Content-Type"] == "application/pkix-crl"
            return reply.read()

    return x509.load_der_x509_crl(await asyncio.to_thread(get))


async def test_every_minting_path_names_the_crl_and_the_url_serves_it(tmp_path: Path) -> None:
    port = free_port("127.0.0.1")
    url = f"http://127.0.0.1:{port}/crl/{DER_NAME}"
    settings = replace(
        factory_settings(tmp_path),
        mint=MintPolicy(crl_url=url),
        crl=CrlSettings(http_port=port, url=url),
    )
    async with running_factory(settings) as factory:
        stub = factory.stub
        from_csr = await stub.MintCertificate(
            pb.MintCertificateRequest(device_id="cdp-csr", csr_pem=make_csr(make_key("p256"), "cdp-csr"))
        )
        server_key = await stub.MintCertificate(
            pb.MintCertificateRequest(device_id="cdp-key", server_key_generation=pb.ServerKeyGeneration())
        )
        header, items = _csr_lot("cdp-lot", ["cdp-lot-0", "cdp-lot-1"])
        csr_lot, _ = await _send(stub, header, items)
        generated_header = pb.LotHeader(
            lot_id="cdp-gen", key_source=pb.KEY_SOURCE_SERVER_GENERATED, item_count=2, derive_device_ids=True
        )
        generated_lot, _ = await _send(stub, generated_header, [])
        chains = [from_csr.certificate.certificate_chain_pem, server_key.certificate.certificate_chain_pem]
        chains += [r.certificate.certificate_chain_pem for r in (*csr_lot, *generated_lot)]
        leaves = [_leaf(chain) for chain in chains]
        assert len(leaves) == 6
        assert all(_crl_urls(leaf) == [url] for leaf in leaves)

        # revoke one certificate of each path; the URL each certificate names serves a CRL that lists it
        revoked = [leaves[0], leaves[1], leaves[2], leaves[4]]
        for leaf in revoked:
            await stub.RevokeCertificate(
                pb.RevokeCertificateRequest(
                    serial_number=f"{leaf.serial_number:X}", reason=pb.REVOCATION_REASON_KEY_COMPROMISE
                )
            )
        issuing = factory.app.ca.certificate
        for leaf in leaves:
            crl = await _fetch_crl(_crl_urls(leaf)[0])
            assert crl.issuer == leaf.issuer == issuing.subject
            assert crl.is_signature_valid(issuing.public_key())
            listed = crl.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
            assert listed == (leaf in revoked)


async def test_without_a_crl_url_no_distribution_point_is_written(tmp_path: Path) -> None:
    async with running_factory(factory_settings(tmp_path)) as factory:
        reply = await factory.stub.MintCertificate(
            pb.MintCertificateRequest(device_id="no-cdp", server_key_generation=pb.ServerKeyGeneration())
        )
        with pytest.raises(x509.ExtensionNotFound):
            _leaf(reply.certificate.certificate_chain_pem).extensions.get_extension_for_class(
                x509.CRLDistributionPoints
            )


def test_the_crl_url_setting_reaches_minting_and_must_be_http(tmp_path: Path) -> None:
    env = {"FACTORY_DATA_DIR": str(tmp_path), "FACTORY_CRL_URL": "http://crl.example.com/line-3.crl"}
    settings = load_settings(env)
    assert settings.mint.crl_url == settings.crl.url == "http://crl.example.com/line-3.crl"
    with pytest.raises(SettingsError, match="FACTORY_CRL_URL"):
        load_settings({**env, "FACTORY_CRL_URL": "ldap://crl.example.com/cn=line-3"})
    with pytest.raises(SettingsError, match="FACTORY_CRL_CHECK_SECONDS"):
        load_settings({**env, "FACTORY_CRL_CHECK_SECONDS": "0"})
