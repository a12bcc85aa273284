"""The ``energy:`` section: measuring a run's energy and CO2e with codecarbon, offline.

The country (and region) choose the grid carbon intensity that turns kWh into kg CO2e; they
are checked here against codecarbon's offline data, read from its package files without
importing it (importing codecarbon sets up its loggers and threads; a config load must not).
"""

from __future__ import annotations

import importlib.util
import json
import re
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, ValidationInfo, field_validator

from tunesmith.config.base import _Section

DEFAULT_COUNTRY = "USA"
# codecarbon's regional data (its offline tracker uses a region only for these countries)
_REGION_FILES = {"USA": "2023/usa_emissions.json", "CAN": "2023/canada_energy_mix.json",
                 "CHN": "2023/china_provincial_emissions.json",
                 "SWE": "nordic_emissions.json", "NOR": "nordic_emissions.json",
                 "FIN": "nordic_emissions.json"}
# how codecarbon matches a Chinese province: its name, without such a suffix
_CHINA_SUFFIX = re.compile(r"\s+(autonomous region|municipality|province|sheng|shi|zizhiqu)$")


def _data_dir() -> Path | None:
    """codecarbon's ``data/private_infra`` folder, or None when codecarbon is not installed."""
    spec = importlib.util.find_spec("codecarbon")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "private_infra"
    return path if path.is_dir() else None


@lru_cache(maxsize=1)
def known_countries() -> dict[str, str] | None:
    """ISO 3166-1 alpha-3 code -> country name, for every country codecarbon has offline
    energy-mix data for; None when codecarbon's data cannot be read (then any code passes
    here, and the run's energy figures say what went wrong)."""
    folder = _data_dir()
    try:
        mix = json.loads((folder / "global_energy_mix.json").read_text(encoding="utf-8")) \
            if folder else None
    except (OSError, ValueError):
        return None
    return {code: str(v.get("country_name", code)) for code, v in mix.items()} if mix else None


@lru_cache(maxsize=8)
def known_regions(country: str) -> set[str] | None:
    """The regions codecarbon has offline data for in ``country`` (lower case), or None."""
    folder, name = _data_dir(), _REGION_FILES.get(country)
    if folder is None or name is None:
        return None
    try:
        data = json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if country == "CHN":  # provinces by their names (e.g. 'beijing', 'guangdong')
        return {n.lower() for v in data["data"].values() for n in v.get("names", [])}
    if country in ("SWE", "NOR", "FIN"):  # electricity bidding zones (SE1 ... NO5, FI)
        prefix = {"SWE": "SE", "NOR": "NO", "FIN": "FI"}[country]
        return {z.lower() for z in data["data"] if z.startswith(prefix)}
    return {k.lower() for k in data if not k.startswith("_")}


class EnergyConfig(_Section):
    enabled: bool = Field(
        True, description="Measure the energy (kWh) and emissions (kg CO2e) of training and "
        "evaluation with codecarbon, offline (nothing is sent anywhere); they go to "
        "metrics.json and the report. A failure to measure never fails the run.")
    country_iso_code: str = Field(
        DEFAULT_COUNTRY, description="Where the machine draws its power, as an ISO 3166-1 "
        "alpha-3 code (e.g. FRA, DEU, GBR, IND, CAN): it sets the grid carbon intensity (g "
        "CO2e per kWh, from codecarbon's offline data) that turns kWh into CO2e. The default, "
        "USA, is a fixed choice so that runs compare; its grid (about 370 g/kWh in "
        "codecarbon's data) lies mid-range (world average 475). Set your own country: the "
        "emissions scale with it.")
    region: str | None = Field(
        None, description="A finer grid region where codecarbon has offline data: a US state "
        "(country USA, e.g. 'california'), a Canadian province (CAN), a Chinese province "
        "(CHN), or an electricity bidding zone (SWE: SE1-SE4, NOR: NO1-NO5, FIN: FI). Empty: "
        "the country's average.")
    measure_power_secs: float = Field(
        15.0, gt=0, description="Seconds between codecarbon's power readings (its default). "
        "Each phase is measured again when it ends, so short phases are still counted.")
    tracking_mode: Literal["machine", "process"] = Field(
        "machine", description="'machine': the whole machine's CPU load and memory "
        "(codecarbon's default). 'process': only this process and its children, for a "
        "machine shared with other work. A GPU is always measured whole.")

    @field_validator("country_iso_code")
    @classmethod
    def _known_country(cls, v: str, info: ValidationInfo) -> str:
        code = v.strip().upper()
        if not info.data.get("enabled", True):
            return code  # not measured: the grid data is never looked up
        if len(code) != 3 or not code.isalpha():
            raise ValueError(f"'{v}' is not an ISO 3166-1 alpha-3 country code; use three "
                             "letters, e.g. USA, FRA, DEU, GBR, IND")
        known = known_countries()
        if known is not None and code not in known:
            raise ValueError(f"codecarbon has no offline grid data for '{v}'; set "
                             "energy.country_iso_code to the ISO 3166-1 alpha-3 code of a "
                             "country it knows (e.g. USA, FRA, DEU, GBR, IND, CHN), or "
                             "energy.enabled: false")
        return code

    @field_validator("region")
    @classmethod
    def _known_region(cls, v: str | None, info: ValidationInfo) -> str | None:
        country = info.data.get("country_iso_code")
        if v is None or country is None or not info.data.get("enabled", True):
            return v  # a wrong country is reported on its own
        if country not in _REGION_FILES:
            raise ValueError(f"codecarbon has regional data only for "
                             f"{', '.join(sorted(_REGION_FILES))}, not {country}; leave "
                             "energy.region empty to use the country's average")
        regions = known_regions(country)
        name = " ".join(v.lower().split())
        if country == "CHN":
            name = _CHINA_SUFFIX.sub("", name)
        if regions is not None and name not in regions:
            raise ValueError(f"'{v}' is not a region codecarbon knows in {country}; use one "
                             f"of {', '.join(sorted(regions)[:12])}"
                             + (", ..." if len(regions) > 12 else "")
                             + ", or leave energy.region empty")
        return v
