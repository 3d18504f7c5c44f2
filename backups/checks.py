"""System checks of the backup settings that `manage.py check --deploy` runs."""

from django.conf import settings
from django.core import checks

# The strategy's iterations of gpg's key derivation, the most gpg encodes.
STRATEGY_S2K_COUNT = 65011712


@checks.register(checks.Tags.security, deploy=True)
def key_derivation(app_configs, **kwargs):
    """A lowered GPG_S2K_COUNT is for the test suite: in production it makes the passphrase cheaper to guess."""
    if settings.GPG_S2K_COUNT >= STRATEGY_S2K_COUNT:
        return []
    return [
        checks.Warning(
            f"GPG_S2K_COUNT is {settings.GPG_S2K_COUNT}, below the strategy's {STRATEGY_S2K_COUNT}: "
            "every passphrase-encrypted artifact is cheaper to attack by guessing",
            hint="remove GPG_S2K_COUNT from the environment (its default is the strategy's)",
            id="backups.W001",
        )
    ]
