"""Fixtures of the deployment tests: a booted Debian node to deploy onto."""
import pytest

import owca_nspawn


@pytest.fixture(scope="session")
def node():
    """A booted bookworm container reachable over ssh; stopped by its pid at the end."""
    reason = owca_nspawn.missing_requirements()
    if reason:
        pytest.skip(f"no booted systemd node: {reason}")
    with owca_nspawn.booted_node() as container:
        yield container
