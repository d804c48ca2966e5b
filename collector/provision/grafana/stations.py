"""What the bike dashboards share: a station's state now, drawn on a map coloured by bikes
or free docks, and the variable that picks the colour."""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as cb
from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.builders import geomap
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import geomap as geomap_model

from collector.provision.grafana.common import (
    AVAILABILITY,
    TO_SECS,
    UID_HISTORY,
    InfluxQL,
    panel,
)

# Each station's newest values in the window, as the map and the nearby table show them.
STATION_NOW = (
    'last("lat") AS "lat", last("lon") AS "lon", last("${colour_by}") AS "colour", '
    'last("name") AS "name", last("bikes_available") AS "bikes", '
    'last("ebikes_available") AS "ebikes", last("docks_available") AS "docks", '
    f'{TO_SECS} - last("last_reported") AS "report_age_s"'
)
STATION_NOW_COLUMNS = ("lat", "lon", "colour", "name", "bikes", "ebikes", "docks", "report_age_s")


def colour_by() -> db.CustomVariable:
    return (
        db.CustomVariable("colour_by")
        .label("Colour by")
        .values("Bikes : bikes_available, Free docks : docks_available")
    )


def station_geomap(title: str, grid_pos: dm.GridPos, target: InfluxQL) -> geomap.Panel:
    """Stations as dots, red with none, orange with 1-3, green with more (bikes or docks, as
    ``colour_by`` says), each linking to its history."""
    markers = (
        cb.MapLayerOptions()
        .type("markers")
        .name("Stations")
        .location(
            cb.FrameGeometrySource()
            .mode(cm.FrameGeometrySourceMode.COORDS)
            .latitude("lat")
            .longitude("lon")
        )
        .config(
            {
                "showLegend": True,
                "style": {
                    "color": {"field": "colour", "fixed": "dark-green"},
                    "opacity": 0.85,
                    "size": {"fixed": 7},
                    "symbol": {"fixed": "img/icons/marker/circle.svg", "mode": "fixed"},
                },
            }
        )
        .tooltip(True)
    )
    station_link = db.DashboardLink("Station history").url(
        f"/d/{UID_HISTORY}?var-system=${{system}}&var-station=${{__data.fields.station_id}}"
    )
    return (
        panel(geomap.Panel, title, grid_pos, target)
        .description("Colour: red none, orange 1-3, green more than 3 (bikes, or free docks).")
        .thresholds(AVAILABILITY)
        .color_scheme(db.FieldColor().mode(dm.FieldColorModeId.THRESHOLDS))
        .view(geomap.MapViewConfig().id("fit").zoom(12))
        .basemap(cb.MapLayerOptions().type("osm-standard").name("Basemap"))
        .layers([markers])
        .tooltip(geomap.TooltipOptions().mode(geomap_model.TooltipMode.DETAILS))
        .data_links([station_link])
        .override_by_name("report_age_s", [dm.DynamicConfigValue(id_val="unit", value="s")])
    )
