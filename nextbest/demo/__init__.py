"""The deterministic demo shop and the offer simulator."""
