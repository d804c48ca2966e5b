"""Grafana provisioning, generated: datasources, dashboards, alert rules, contact point,
policy (grafana-foundation-sdk, pinned). One module per dashboard, panels as named functions;
every bucket, measurement, tag and field comes from ``collector.contract``."""

from collector.provision.grafana.files import compare, render, write

__all__ = ["compare", "render", "write"]
