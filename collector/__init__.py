"""Live bike-share and sensor data into InfluxDB."""

__version__ = "0.1.0"
