"""FACTORY_ENROLL_CODE_HASH chooses the kind of record new codes get (HMAC-SHA-256 unless scrypt is asked
for); a value that names no kind is refused at start-up with the setting's name; the issuer makes, and
retains, codes of the chosen kind."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from factory_svc.enrollment.app import load_enroll_settings
from factory_svc.enrollment.codes import CodeIssuer
from factory_svc.enrollment.outbox import Outbox
from factory_svc.enrollment.retained import KEY_FILE, RetainedCodes, code_id
from provkit.activation_code import CodeHash, verify_code
from provkit.settings import SettingsError, SettingsSource

NOW = datetime(2026, 1, 1, tzinfo=UTC)
DPS = "HostName=dps.example.test;SharedAccessKeyName=provisioningserviceowner;SharedAccessKey=c2VjcmV0"


def _policy(**env: str):
    source = SettingsSource("FACTORY", env={"FACTORY_CLOUD_DPS_CONNECTION_STRING": DPS, **env})
    settings = load_enroll_settings(source)
    assert settings is not None
    return settings.policy


def test_the_default_is_the_fast_keyed_hash():
    assert _policy().code_hash is CodeHash.HMAC_SHA256


def test_scrypt_can_still_be_chosen_with_its_cost():
    policy = _policy(FACTORY_ENROLL_CODE_HASH="Scrypt", FACTORY_ENROLL_CODE_HASH_LOG2_N="10")
    assert policy.code_hash is CodeHash.SCRYPT and policy.code_hash_log2_n == 10


def test_an_unknown_kind_is_refused_by_name():
    with pytest.raises(SettingsError, match="FACTORY_ENROLL_CODE_HASH") as refused:
        _policy(FACTORY_ENROLL_CODE_HASH="md5")
    assert "hmac-sha256, scrypt" in str(refused.value)


@pytest.mark.parametrize("alg", list(CodeHash))
async def test_the_issuer_makes_retained_codes_of_the_chosen_kind(tmp_path, alg):
    outbox = await Outbox.open(tmp_path / "enrollments.sqlite3")
    issuer = CodeIssuer(await RetainedCodes.on(outbox.database, tmp_path / KEY_FILE), 8, lambda: NOW, alg)
    try:
        made = await issuer.new_codes([f"dev-{k}" for k in range(25)])
        assert [record["alg"] for _, record in made] == [alg.value] * 25
        assert all(verify_code(code, record) for code, record in made)
        kept = await issuer.retained.find("dev-3", code_id(made[3][1]))
        assert kept == made[3][0]
    finally:
        issuer.close()
        await outbox.close()
