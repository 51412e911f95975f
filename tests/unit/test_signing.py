"""The stack secret: made once and shared by the processes of a data directory; tags bound to their
purpose and parts."""

from __future__ import annotations

import pytest

from bus.signing import SecretError, Signer
from services.settings import Settings


def test_processes_of_one_data_directory_share_one_secret(tmp_path):
    settings = Settings(data_dir=tmp_path)
    first = Signer.from_file(settings.bus.secret_file)
    again = Signer.from_file(Settings(data_dir=tmp_path).bus.secret_file)
    assert first.token("resume", "public", "r1") == again.token("resume", "public", "r1")
    assert (tmp_path / "secret").stat().st_mode & 0o077 == 0  # nobody else may read it
    other = Signer.from_file(Settings(data_dir=tmp_path / "other").bus.secret_file)
    assert other.token("resume", "public", "r1") != first.token("resume", "public", "r1")


def test_a_token_passes_only_for_its_own_purpose_and_parts(tmp_path):
    signer = Signer(b"z" * 32)
    token = signer.token("resume", "acme", "r1")
    assert signer.check_token(token, "resume", "acme", "r1")
    assert not signer.check_token(token, "resume", "acme", "r2")
    assert not signer.check_token(token, "resume", "other", "r1")
    assert not signer.check_token(token, "kv-block", "acme", "r1")
    # parts are length-prefixed: ("ab", "c") is not ("a", "bc")
    assert signer.tag("p", "ab", "c") != signer.tag("p", "a", "bc")
    assert signer.check_tag(signer.tag("p", b"x", size=8), "p", b"x")
    assert "zzzz" not in repr(signer)


def test_a_short_or_missing_secret_is_refused(tmp_path):
    with pytest.raises(SecretError):
        Signer(b"short")
    with pytest.raises(SecretError, match="cannot read"):
        Signer.from_file(tmp_path / "missing", create=False)
