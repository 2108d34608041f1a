"""edgefleet agent: the device daemon (camera → detector → MQTT, OTA model updates)."""

__version__ = "0.1.0"
