"""The report's "Energy and emissions" section, from ``results["energy"]`` (see report.py).

The method (how codecarbon obtained the power, and which grid turned kWh into CO2e) is
stated right above the figures: an estimate from a TDP reads differently from a RAPL count.
"""

from __future__ import annotations

from typing import Any

from tunesmith.evaluation.blocks import Table, Text, fmt

SCOPE = ("'evaluation' is the base model's evaluation before training and the tuned model's "
         "after (test set, calibration, forgetting, held-out preference pairs); loading the "
         "model, preparing the data and writing the report are not counted. A resumed run "
         "counts what ran after the resume.")


def energy_blocks(energy: dict[str, Any] | None) -> list:
    """Method, then one row per phase and the total; [] when energy was not measured."""
    if not energy:
        return []
    phases = [(name, v) for name, v in energy.items() if isinstance(v, dict) and name != "total"]
    total = energy.get("total") or {}
    version = energy.get("codecarbon_version") or "?"
    where = energy.get("country_name") or energy.get("country_iso_code") or "?"
    if energy.get("country_name") and energy.get("country_iso_code"):
        where += f" ({energy['country_iso_code']})"
    if energy.get("region"):
        where += f", region {energy['region']}"
    intensity = energy.get("carbon_intensity_g_per_kwh")
    grid = f": {intensity:.0f} g CO2e/kWh" if isinstance(intensity, int | float) else ""
    method = energy.get("method")
    how = (f"Measured with codecarbon {version}, offline, "
           f"{energy.get('tracking_mode', 'machine')} tracking. Power: {method}. " if method
           else f"Not measured: codecarbon {version} gave no figures ({total.get('error')}). ")
    blocks: list = [Text(f"{how}CO2e = energy x the carbon intensity of the grid in {where} "
                         f"from codecarbon's offline data{grid}. {SCOPE}")]
    rows = [[name, _seconds(v.get("seconds")), fmt(v.get("kwh")), fmt(v.get("kg_co2e")),
             fmt(v.get("cpu_kwh")), fmt(v.get("gpu_kwh")), fmt(v.get("ram_kwh"))]
            for name, v in [*phases, ("total", total)]]
    blocks.append(Table(["phase", "seconds", "kWh", "kg CO2e", "CPU kWh", "GPU kWh",
                         "RAM kWh"], rows))
    failed = [f"{name}: {v['error']}" for name, v in phases if v.get("error")]
    if failed:
        blocks.append(Text("Not measured (the run went on): " + "; ".join(failed) + "."))
    return blocks


def _seconds(x: Any) -> str:
    return f"{x:.1f}" if isinstance(x, int | float) else "-"
