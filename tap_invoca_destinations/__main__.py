"""Run the tap: ``python -m tap_invoca_destinations``."""

from tap_invoca_destinations.tap import TapInvocaDestinations

TapInvocaDestinations.cli()
