"""The portal's signing key: stock gpg verifies its signatures; verify() trusts only the key given."""

import subprocess

import pytest

from backupportal.lib import signing


@pytest.fixture
def signing_dir(settings, tmp_path):
    settings.SIGNING_KEY_DIR = tmp_path / "signing"
    return settings.SIGNING_KEY_DIR


def test_a_signature_verifies_with_the_public_half_alone_and_with_stock_gpg(signing_dir, tmp_path):
    data = b"manifest of run 7\n"
    signature = signing.sign(data)
    public = signing.public_key()
    assert "PRIVATE" not in public
    assert signing.verify(data, signature, public) == signing.fingerprint()
    assert (signing_dir.stat().st_mode & 0o077) == 0

    home = tmp_path / "auditor"
    home.mkdir(mode=0o700)
    (tmp_path / "data").write_bytes(data)
    (tmp_path / "data.asc").write_bytes(signature)
    (tmp_path / "key.asc").write_text(public)
    gpg = ["gpg", "--batch", "--homedir", str(home)]
    subprocess.run([*gpg, "--import", str(tmp_path / "key.asc")], check=True, capture_output=True)
    good = subprocess.run([*gpg, "--verify", str(tmp_path / "data.asc"), str(tmp_path / "data")], capture_output=True)
    assert good.returncode == 0, good.stderr
    (tmp_path / "data").write_bytes(b"manifest of run 8\n")
    bad = subprocess.run([*gpg, "--verify", str(tmp_path / "data.asc"), str(tmp_path / "data")], capture_output=True)
    assert bad.returncode != 0


def test_altered_data_or_another_key_is_refused(signing_dir, settings, tmp_path):
    data = b'{"run": 7, "sha256": "ab"}'
    signature = signing.sign(data)
    public = signing.public_key()
    with pytest.raises(signing.SigningError, match="does not verify"):
        signing.verify(data.replace(b"ab", b"ac"), signature, public)

    settings.SIGNING_KEY_DIR = tmp_path / "forger"
    forged = signing.sign(data)  # a valid signature, by a key that is not the portal's
    with pytest.raises(signing.SigningError, match="does not verify"):
        signing.verify(data, forged, public)
    with pytest.raises(signing.SigningError, match="not an OpenPGP public key"):
        signing.verify(data, signature, "not a key")


def test_no_key_is_named_with_what_to_do(signing_dir):
    with pytest.raises(signing.SigningError, match="SIGNING_KEY_DIR"):
        signing.fingerprint()
