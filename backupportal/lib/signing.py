"""The portal's signing key: detached OpenPGP signatures a stock `gpg --verify` checks.

Manifests beside the artifacts (a fresh portal trusts them only when they verify) and the
auditor's evidence pack are signed with it. The key pair is an Ed25519 OpenPGP key in its own
GnuPG home, SIGNING_KEY_DIR (0700), made by the first signature (`ensure_key()`); its public half is exported to
SIGNING_KEY_DIR/signing-public.asc, to be kept with the restore keys, because a portal that holds
only that public half must still refuse a forged manifest. The private half is never inside a
backup of the portal (selfbackup): a copy of the catalog must not be able to sign.

Verification never trusts a key that came with the signed data: `verify()` imports the given
public key into a throwaway GnuPG home and accepts only a good signature by that key's fingerprint.
"""

import os
import tempfile
from pathlib import Path

import gnupg
from django.conf import settings

from backupportal.lib.childenv import child_env

PUBLIC_KEY_NAME = "signing-public.asc"
KEY_UID = "backupportal signing key <backupportal@localhost>"


class SigningError(Exception):
    """No signing key, or a signature that does not verify; the message says what to do."""


def key_dir() -> Path:
    return Path(settings.SIGNING_KEY_DIR)


def public_key_path() -> Path:
    return key_dir() / PUBLIC_KEY_NAME


def _gpg(home: Path) -> gnupg.GPG:
    # Given to the constructor: it runs gpg itself (--list-config), which must not inherit the
    # portal's secrets (S3 keys ...) either.
    return gnupg.GPG(gnupghome=str(home), env=child_env())


def _private_home() -> Path:
    home = key_dir()
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(home, 0o700)
    return home


def fingerprint() -> str:
    """The signing key's fingerprint, or SigningError when the portal has none yet."""
    keys = _gpg(_private_home()).list_keys(secret=True)
    if not keys:
        raise SigningError(
            f"the portal has no signing key in {key_dir()} (SIGNING_KEY_DIR): copy the key directory from the "
            "portal's host, or sign something (a backup's manifest) to make a new one"
        )
    return keys[0]["fingerprint"]


def ensure_key() -> str:
    """Make the key pair when there is none; its fingerprint either way."""
    gpg = _gpg(_private_home())
    keys = gpg.list_keys(secret=True)
    if keys:
        return keys[0]["fingerprint"]
    made = gpg.gen_key(
        gpg.gen_key_input(
            key_type="EDDSA",
            key_curve="ed25519",
            key_usage="sign",
            name_real="backupportal signing key",
            name_email="backupportal@localhost",
            expire_date=0,
            no_protection=True,
        )
    )
    if not made.fingerprint:
        raise SigningError(f"gpg could not make the signing key in {key_dir()}: {made.stderr.strip()[-300:]}")
    export_public(made.fingerprint)
    return made.fingerprint


def export_public(fpr: str | None = None) -> Path:
    """Write the public half to SIGNING_KEY_DIR/signing-public.asc and return the path."""
    fpr = fpr or fingerprint()
    armored = _gpg(_private_home()).export_keys(fpr)
    path = public_key_path()
    path.write_text(armored)
    return path


def public_key() -> str:
    """The public half, armored (what an auditor or a fresh portal is given)."""
    path = public_key_path()
    if not path.exists():
        export_public()
    return path.read_text()


def sign(data: bytes) -> bytes:
    """A detached, armored signature of `data` by the portal's key (made on first use)."""
    fpr = ensure_key()
    signed = _gpg(_private_home()).sign(data, keyid=fpr, detach=True, binary=False)
    if not signed.data:
        raise SigningError(f"gpg could not sign with the portal's key: {signed.stderr.strip()[-300:]}")
    return signed.data


def verify(data: bytes, signature: bytes, public_key_armored: str) -> str:
    """The signer's fingerprint when `signature` is a good signature of `data` by that public key.

    Anything else (another key, altered data, a damaged signature) raises SigningError.
    """
    with tempfile.TemporaryDirectory(prefix="bp-verify-") as home:
        os.chmod(home, 0o700)
        gpg = _gpg(Path(home))
        imported = gpg.import_keys(public_key_armored)
        expected = {fpr for fpr in imported.fingerprints if fpr}
        if not expected:
            raise SigningError(
                "the public key given is not an OpenPGP public key: give the portal's signing-public.asc"
            )
        sig_path = Path(home) / "data.sig"
        sig_path.write_bytes(signature)
        result = gpg.verify_data(str(sig_path), data)
        signer = result.pubkey_fingerprint or result.fingerprint
        if not result.valid or signer not in expected:
            why = result.status or "no valid signature"
            raise SigningError(
                f"the signature does not verify with the given public key ({why}): the data was altered or signed by another key"
            )
        return signer
