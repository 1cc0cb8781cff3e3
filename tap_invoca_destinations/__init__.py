"""Singer tap for Invoca Destinations (customer phone numbers), built on the Meltano Singer SDK."""
