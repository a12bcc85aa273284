"""The energy meter: codecarbon, offline, around a phase that burns CPU; a broken codecarbon
costs the figures, never the run; nothing is written to the working directory, nothing goes
to the network, and codecarbon's log lines reach our log, not the terminal."""

from __future__ import annotations

import logging
import socket
import time
from pathlib import Path

import pytest

from tunesmith.config import EnergyConfig
from tunesmith.evaluation.blocks import Table, Text
from tunesmith.evaluation.energy_section import energy_blocks
from tunesmith.flows import energy
from tunesmith.flows.energy import EnergyMeter


def burn(seconds: float) -> int:
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        n += 1
    return n


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list:
    tried: list = []

    def refuse(self, address, *args, **kwargs):  # noqa: ANN001
        tried.append(address)
        raise OSError("the network is off in this test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    return tried


def test_a_phase_that_burns_cpu_has_energy_and_emissions(tmp_path: Path, no_network: list,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capfd: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)  # codecarbon's files (emissions.csv, ...) would land here
    run_log = logging.FileHandler(tmp_path / "run.log")
    logging.getLogger("tunesmith").addHandler(run_log)
    try:
        meter = EnergyMeter(EnergyConfig(measure_power_secs=0.5))
        with meter.phase("training"):
            burn(1.5)
        with meter.phase("evaluation"):
            burn(0.5)
        with meter.phase("evaluation"):  # a phase entered twice adds up
            burn(0.5)
        logging.getLogger("codecarbon").warning("probe from codecarbon")
    finally:
        logging.getLogger("tunesmith").removeHandler(run_log)
        run_log.close()
    out = meter.results()
    assert out is not None
    for name in ("training", "evaluation", "total"):
        phase = out[name]
        assert phase["kwh"] > 0 and phase["kg_co2e"] > 0, (name, phase)
        assert phase["error"] is None
    assert out["training"]["seconds"] == pytest.approx(1.5, abs=0.3)
    assert out["evaluation"]["seconds"] == pytest.approx(1.0, abs=0.3)
    assert out["total"]["kwh"] == pytest.approx(out["training"]["kwh"]
                                                + out["evaluation"]["kwh"])
    assert isinstance(out["method"], str) and "CPU" in out["method"]
    assert out["training"]["method"] == out["method"]
    assert out["country_iso_code"] == "USA" and out["country_name"] == "United States"
    assert out["carbon_intensity_g_per_kwh"] > 0 and out["codecarbon_version"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.log"]
    assert no_network == []
    assert "probe from codecarbon" in (tmp_path / "run.log").read_text()
    assert "codecarbon" not in capfd.readouterr().err


class _Broken:
    def __init__(self, *args: object, **kwargs: object) -> None:
        raise RuntimeError("no power reading here")


def test_a_broken_codecarbon_gives_nulls_and_the_reason(monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture
                                                        ) -> None:
    import codecarbon

    monkeypatch.setattr(codecarbon, "OfflineEmissionsTracker", _Broken)
    meter = EnergyMeter(EnergyConfig())
    ran = []
    with caplog.at_level(logging.WARNING, logger="tunesmith"), meter.phase("training"):
        ran.append(burn(0.1))
    assert ran  # the block ran; nothing was raised
    out = meter.results()
    assert out is not None
    training = out["training"]
    assert training["kwh"] is None and training["kg_co2e"] is None
    assert "no power reading here" in training["error"]
    assert out["total"]["kwh"] is None and "training" in out["total"]["error"]
    assert out["method"] is None and out["country_iso_code"] == "USA"
    assert any("energy not measured" in r.getMessage() for r in caplog.records)
    # the report says so, beside an empty row
    text = " ".join(b.text for b in energy_blocks(out) if isinstance(b, Text))
    assert "Not measured" in text and "no power reading here" in text


def test_a_tracker_that_swallowed_its_failure_is_reported(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    class Silent:  # codecarbon logs and swallows its own exceptions: no data at the end
        def start(self) -> None: ...
        def stop(self) -> None: ...

    monkeypatch.setattr(energy, "make_tracker", lambda cfg: Silent())
    meter = EnergyMeter(EnergyConfig())
    with pytest.raises(KeyError), meter.phase("evaluation"):  # the block's error passes
        raise KeyError("from the block")
    out = meter.results()
    assert out is not None and out["evaluation"]["kwh"] is None
    assert "recorded no measurement" in out["evaluation"]["error"]


def test_a_disabled_meter_measures_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(energy, "make_tracker", _Broken)
    meter = EnergyMeter(EnergyConfig(enabled=False))
    with meter.phase("training"):
        pass
    assert meter.results() is None and energy_blocks(None) == []


def test_the_report_section_states_the_method_beside_the_numbers() -> None:
    phase = {"kwh": 2e-4, "kg_co2e": 7e-5, "seconds": 12.5, "cpu_kwh": 1e-4, "gpu_kwh": 0.0,
             "ram_kwh": 1e-4, "method": "CPU energy measured by RAPL counters", "error": None}
    blocks = energy_blocks({
        "training": phase, "evaluation": phase, "total": {**phase, "kwh": 4e-4},
        "method": "CPU energy measured by RAPL counters", "country_iso_code": "FRA",
        "country_name": "France", "region": None, "carbon_intensity_g_per_kwh": 56.0,
        "tracking_mode": "machine", "codecarbon_version": "3.3.2"})
    text, table = blocks[0], blocks[1]
    assert isinstance(text, Text) and isinstance(table, Table)
    assert "RAPL" in text.text and "France (FRA)" in text.text and "56" in text.text
    assert [r[0] for r in table.rows] == ["training", "evaluation", "total"]
    assert table.rows[-1][2] == "0.0004" and table.rows[0][3] == "7e-05"
