"""The ``energy:`` section: the country and region are checked against codecarbon's offline
grid data, with errors that name the field and what to write instead."""

from __future__ import annotations

import pytest

from tunesmith.cli.config import default_config_text
from tunesmith.config import EnergyConfig, parse_config
from tunesmith.errors import ConfigError


def energy(**values: object) -> EnergyConfig:
    return parse_config({"data": {"train_file": "t.jsonl"}, "energy": values}).energy


def test_defaults_are_on_and_usa() -> None:
    cfg = parse_config({"data": {"train_file": "t.jsonl"}}).energy
    assert cfg.enabled and cfg.country_iso_code == "USA" and cfg.region is None
    assert energy(country_iso_code="fra").country_iso_code == "FRA"


@pytest.mark.parametrize(("values", "says"), [
    ({"country_iso_code": "XYZ"}, "energy.country_iso_code: codecarbon has no offline grid "
                                  "data for 'XYZ'; set energy.country_iso_code to the ISO "
                                  "3166-1 alpha-3 code"),
    ({"country_iso_code": "FR"}, "energy.country_iso_code: 'FR' is not an ISO 3166-1 alpha-3"),
    ({"country_iso_code": "USA", "region": "atlantis"}, "energy.region: 'atlantis' is not a "
                                                         "region codecarbon knows in USA"),
    ({"country_iso_code": "FRA", "region": "bretagne"}, "energy.region: codecarbon has "
                                                         "regional data only for"),
])
def test_an_unknown_place_is_a_config_error_naming_the_field(values: dict, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        energy(**values)
    assert says in str(err.value)


def test_known_regions_and_a_disabled_meter_pass() -> None:
    assert energy(region="California").region == "California"
    assert energy(country_iso_code="CAN", region="quebec").region == "quebec"
    assert energy(country_iso_code="SWE", region="SE3").region == "SE3"
    assert energy(enabled=False, country_iso_code="XYZ").country_iso_code == "XYZ"


def test_config_init_documents_the_energy_section() -> None:
    lines = default_config_text().splitlines()
    at = lines.index("energy:")
    for name, field in EnergyConfig.model_fields.items():
        i = next(i for i, line in enumerate(lines[at:], at) if line.startswith(f"  {name}:"))
        assert lines[i - 1] == f"  # {field.description}"
