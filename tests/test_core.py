"""The Singer SDK's standard tap tests, pointed at the loopback Invoca server."""

from __future__ import annotations

import atexit

from helpers import config_for
from invoca_server import InvocaServer
from singer_sdk.testing import SuiteConfig, get_tap_test_class

from tap_invoca_destinations.tap import TapInvocaDestinations

# get_tap_test_class builds the tap at import time, so the server must exist now.
SERVER = InvocaServer(120).start()
atexit.register(SERVER.stop)

TestTapInvocaDestinations = get_tap_test_class(
    tap_class=TapInvocaDestinations,
    config=config_for(SERVER),
    suite_config=SuiteConfig(max_records_limit=500),
    parse_env_config=False,
)
