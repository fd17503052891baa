"""Each family module's kept engine (tests/family_checks.py) ends with the module."""

import pytest

from tests.family_checks import close_engines


@pytest.fixture(scope="module", autouse=True)
def engines_end_with_the_module():
    yield
    close_engines()
