"""The embedded durable event log: partitions of CRC-framed segments."""
