"""Every planned point of every experiment, at every scale, composes to the identity hash
recorded in ``tests/config_identities.json`` (the combinations: ``test_config_layout.py``; the
helpers and how to rewrite the file: ``tests/config_identities.py``)."""

from __future__ import annotations

import pytest
from config_identities import check_unchanged, planned_identities


@pytest.mark.slow
def test_planned_identities_unchanged() -> None:
    check_unchanged(planned_identities(), planned=True)
