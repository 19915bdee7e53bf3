"""The swarm's --username and --password options."""

from __future__ import annotations

import pytest

from ironshadow.swarm.options import SwarmOptions, SwarmUsageError, check


def test_swarm_credentials_per_client():
    options = SwarmOptions(username="{client_id}", password="{client_id}-pw")
    assert options.credentials("swarm-3") == ("swarm-3", b"swarm-3-pw")


def test_swarm_credentials_shared():
    options = SwarmOptions(username="swarm", password="secret")
    assert options.credentials("swarm-3") == ("swarm", b"secret")
    assert SwarmOptions().credentials("swarm-3") == (None, None)


def test_swarm_password_needs_username():
    with pytest.raises(SwarmUsageError, match="--password without --username"):
        check(SwarmOptions(password="secret"))
