"""The stock tools' side of the tests: what a DBA types without the portal (README, "Restoring
without the portal"), shared by the tests that recover the portal's artifacts by hand."""

import subprocess
from pathlib import Path


def stock(script, tmp_path, passphrase_file):
    """A bash pipeline with a fresh GNUPGHOME and P the passphrase file: no portal code."""
    home = tmp_path / "gnupg"
    home.mkdir(mode=0o700, exist_ok=True)
    done = subprocess.run(
        ["bash", "-c", f"set -euo pipefail\n{script}"],
        env={"PATH": "/usr/bin:/bin", "GNUPGHOME": str(home), "P": str(passphrase_file)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


GPG = "gpg --batch --quiet --pinentry-mode loopback --passphrase-file $P"


# README, "Restoring without the portal": the restore_command, one shell line (WALKEY, ARCHIVE and
# GPGHOME are the DBA's paths: the unwrapped key, the server's copied wal/ folder, an empty 0700 directory).
RESTORE_COMMAND = (
    "gpg --homedir GPGHOME --batch --quiet --pinentry-mode loopback --passphrase-file WALKEY "
    "--decrypt ARCHIVE/*/%f.gpg | zstd -d -q -o %p"
)


def restore_command(walkey, archive, gpghome):
    return (
        RESTORE_COMMAND.replace("WALKEY", str(walkey)).replace("ARCHIVE", str(archive)).replace("GPGHOME", str(gpghome))
    )


def artifact(run, name="main"):
    """The path of a run's artifact on the primary location."""
    copy = run.copies.get(artifact=name, location__kind="primary")
    return Path(copy.location.path) / copy.key
