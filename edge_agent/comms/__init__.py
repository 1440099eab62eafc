"""Communication with the outside world; today only MQTT (see ``mqtt.MqttComms``)."""

from edge_agent.comms.connection import should_fall_back
from edge_agent.comms.mqtt import MqttComms, encode_payload

__all__ = ["MqttComms", "encode_payload", "should_fall_back"]
