"""Energy (kWh) and emissions (kg CO2e) of a run's phases, measured offline with codecarbon.

    meter = EnergyMeter(cfg.energy)
    with meter.phase("training"):
        ...
    results["energy"] = meter.results()

Each ``phase`` block runs one ``codecarbon.OfflineEmissionsTracker``: no file is written, no
network is used (no output method, no API token, the grid data comes with codecarbon), and
codecarbon's log records go to ``tunesmith.energy`` (the run's ``run.log``), not the terminal.
A phase entered twice adds up. The power method is read from what codecarbon set up (its
hardware objects), never assumed. Measuring never fails a run: a phase codecarbon could not
measure records null figures and the reason, and a warning goes to the log.
"""

from __future__ import annotations

import inspect
import logging
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from tunesmith.config import EnergyConfig

log = logging.getLogger("tunesmith.energy")
# said by every codecarbon tracker we make (several runs may measure at once): not news
_NOISE = ("Multiple instances of codecarbon are allowed",)


class _ToRunLog(logging.Handler):
    """Hands codecarbon's records to the handlers of our loggers (a run's run.log), not to
    the root logger's (the terminal), and keeps its problems for the reason of a failure."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if any(n in record.getMessage() for n in _NOISE):
            return
        if record.levelno >= logging.WARNING:
            self.problems.append(record)
        logger: logging.Logger | None = log
        while logger is not None and logger is not logging.getLogger():
            for handler in logger.handlers:
                if record.levelno >= handler.level:
                    handler.handle(record)
            logger = logger.parent if logger.propagate else None


_HANDLER = _ToRunLog()


def _quiet_codecarbon() -> None:
    """codecarbon puts a stderr handler on its logger at import and on every tracker made:
    replace it with ours (run again after each tracker is made)."""
    cc = logging.getLogger("codecarbon")
    cc.handlers = [_HANDLER]
    cc.propagate = False
    cc.setLevel(logging.WARNING)


@dataclass
class _Phase:
    seconds: float = 0.0
    kwh: float | None = 0.0
    kg_co2e: float | None = 0.0
    cpu_kwh: float | None = 0.0
    gpu_kwh: float | None = 0.0
    ram_kwh: float | None = 0.0
    method: str | None = None
    error: str | None = None

    def add(self, data: Any, seconds: float) -> None:
        self.seconds += seconds
        for name, value in (("kwh", data.energy_consumed), ("kg_co2e", data.emissions),
                            ("cpu_kwh", data.cpu_energy), ("gpu_kwh", data.gpu_energy),
                            ("ram_kwh", data.ram_energy)):
            current = getattr(self, name)
            setattr(self, name, None if current is None else current + float(value))

    def fail(self, reason: str, seconds: float) -> None:
        self.seconds += seconds
        self.kwh = self.kg_co2e = self.cpu_kwh = self.gpu_kwh = self.ram_kwh = None
        self.error = reason if self.error is None else f"{self.error}; {reason}"

    def to_dict(self) -> dict[str, Any]:
        return {"kwh": self.kwh, "kg_co2e": self.kg_co2e, "seconds": round(self.seconds, 3),
                "cpu_kwh": self.cpu_kwh, "gpu_kwh": self.gpu_kwh, "ram_kwh": self.ram_kwh,
                "method": self.method, "error": self.error}


@dataclass
class EnergyMeter:
    """Measures named phases; ``results()`` is ``metrics.json["energy"]``."""

    cfg: EnergyConfig
    phases: dict[str, _Phase] = field(default_factory=dict)
    where: dict[str, Any] = field(default_factory=dict)  # what codecarbon actually used

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Measure the block as phase ``name``; its exceptions pass through unchanged."""
        if not self.cfg.enabled:
            yield
            return
        record = self.phases.setdefault(name, _Phase())
        tracker, started = self._start(record), time.perf_counter()
        try:
            yield
        finally:
            self._stop(tracker, record, time.perf_counter() - started)

    def _start(self, record: _Phase) -> Any:
        _HANDLER.problems.clear()
        try:
            tracker = make_tracker(self.cfg)
            tracker.start()
            return tracker
        except Exception as err:  # codecarbon missing or broken: the run goes on
            self._failed(record, f"codecarbon could not start: {type(err).__name__}: {err}")
            return None

    def _stop(self, tracker: Any, record: _Phase, seconds: float) -> None:
        if tracker is None:
            record.seconds += seconds
            return
        try:
            tracker.stop()
            data = getattr(tracker, "final_emissions_data", None)
            if data is None:  # codecarbon swallows its own exceptions and logs them
                raise RuntimeError(_logged_reason() or "codecarbon recorded no measurement")
            method = power_method(tracker)
        except Exception as err:
            record.fail(f"codecarbon could not measure: {err}", seconds)
            log.warning("energy not measured: %s", record.error)
            return
        finally:
            _quiet_codecarbon()
        record.add(data, seconds)
        record.method = record.method or method
        self.where.setdefault("method", method)
        for key in ("country_iso_code", "country_name", "region"):
            self.where.setdefault(key, getattr(data, key, None) or None)
        self.where.setdefault("codecarbon_version", getattr(data, "codecarbon_version", None))

    def _failed(self, record: _Phase, reason: str) -> None:
        record.fail(reason, 0.0)
        log.warning("energy not measured: %s", reason)

    def results(self) -> dict[str, Any] | None:
        """Per phase, the total, and how it was measured; None when measuring is off."""
        if not self.cfg.enabled:
            return None
        first = ("training", "evaluation")  # in reading order, whichever ran first
        names = sorted(self.phases, key=lambda n: first.index(n) if n in first else 2)
        out: dict[str, Any] = {name: self.phases[name].to_dict() for name in names}
        total = _Phase(seconds=sum(p.seconds for p in self.phases.values()))
        for name in ("kwh", "kg_co2e", "cpu_kwh", "gpu_kwh", "ram_kwh"):
            values = [getattr(p, name) for p in self.phases.values()]
            setattr(total, name, None if None in values else sum(values))
        failed = [f"{n}: {p.error}" for n, p in self.phases.items() if p.error]
        total.error = "; ".join(failed) or None
        out["total"] = total.to_dict()
        del out["total"]["method"]
        kwh, kg = total.kwh, total.kg_co2e
        out.update({
            "method": self.where.get("method"),
            "country_iso_code": self.where.get("country_iso_code", self.cfg.country_iso_code),
            "country_name": self.where.get("country_name"),
            "region": self.where.get("region", self.cfg.region),
            "carbon_intensity_g_per_kwh": round(kg / kwh * 1000, 2) if kwh and kg is not None
            else None,
            "tracking_mode": self.cfg.tracking_mode,
            "codecarbon_version": self.where.get("codecarbon_version") or _version(),
        })
        return out


def make_tracker(cfg: EnergyConfig) -> Any:
    """An offline tracker with every setting given here, so nothing comes from codecarbon's
    config files or CODECARBON_* variables that could write a file or reach the network."""
    from codecarbon import OfflineEmissionsTracker
    from codecarbon.emissions_tracker import BaseEmissionsTracker

    settings: dict[str, Any] = dict(
        country_iso_code=cfg.country_iso_code, region=cfg.region, cloud_provider=None,
        cloud_region=None, country_2letter_iso_code=None, project_name="tunesmith",
        measure_power_secs=cfg.measure_power_secs, tracking_mode=cfg.tracking_mode,
        output_methods=[], output_handlers=[], emissions_endpoint=None,
        output_dir=tempfile.gettempdir(), electricitymaps_api_token=None, log_level="warning",
        logger_preamble="", allow_multiple_runs=True, force_cpu_power=None,
        force_ram_power=None, force_carbon_intensity_g_co2e_kwh=None, force_mode_cpu_load=False,
        pue=1.0, wue=0.0, rapl_include_dram=False, rapl_prefer_psys=False, metadata=None)
    # only what this codecarbon knows (an unknown keyword would be swallowed with the rest)
    known = {*inspect.signature(BaseEmissionsTracker.__init__).parameters,
             *inspect.signature(OfflineEmissionsTracker.__init__).parameters}
    if "output_methods" not in known:  # codecarbon 2: no output is said flag by flag
        settings.update(save_to_file=False, save_to_api=False, save_to_logger=False,
                        save_to_prometheus=False, save_to_logfire=False)
    _quiet_codecarbon()
    tracker = OfflineEmissionsTracker(**{k: v for k, v in settings.items() if k in known})
    _quiet_codecarbon()
    if not hasattr(tracker, "_start_time"):  # its __init__ failed (and was swallowed)
        raise RuntimeError(_logged_reason() or "the tracker did not initialise")
    # a token in ~/.codecarbon.config would send the country to the Electricity Maps API
    tracker._electricitymaps_api_token = None
    tracker._co2_signal_api_token = None
    return tracker


def _logged_reason() -> str | None:
    """The exception codecarbon logged and swallowed, else its last warning."""
    problems = _HANDLER.problems
    for record in problems:
        if record.exc_info and record.exc_info[1] is not None:
            err = record.exc_info[1]
            return f"{type(err).__name__}: {err}"
    return problems[-1].getMessage() if problems else None


_CPU_MODES = {
    "intel_rapl": "CPU energy measured by RAPL counters",
    "windows_emi": "CPU energy measured by the Windows Energy Meter Interface (RAPL)",
    "intel_power_gadget": "CPU power measured by Intel Power Gadget",
}


def power_method(tracker: Any) -> str:
    """How codecarbon obtained the power, from the hardware objects it set up."""
    parts = []
    for hw in getattr(tracker, "_hardware", []):
        kind = type(hw).__name__
        if kind == "CPU":
            mode, tdp, model = hw._mode, hw._tdp, hw._model or "unknown CPU"
            assumed = "codecarbon's generic" if getattr(hw, "_is_generic_tdp", False) \
                else "a"
            if mode in _CPU_MODES:
                parts.append(f"{_CPU_MODES[mode]} ({model})")
            elif mode == "cpu_load":
                parts.append(f"CPU power estimated from CPU load and {assumed} TDP of {tdp:g} W "
                             f"({_tdp_source(model)}; codecarbon cpu_load mode)")
            elif mode == "constant":
                parts.append(f"CPU power estimated as half of {assumed} TDP of {tdp:g} W "
                             f"({_tdp_source(model)}; codecarbon constant mode)")
            else:
                parts.append(f"CPU power by codecarbon's {mode} mode ({model})")
        elif kind == "GPU":
            model = getattr(tracker, "_conf", {}).get("gpu_model") or "GPU"
            parts.append(f"GPU energy measured by {_gpu_interface()} ({model})")
        elif kind == "RAM":
            forced = getattr(hw, "_force_ram_power", None)
            parts.append(f"RAM power {forced:g} W as given" if forced is not None
                         else "RAM power estimated by codecarbon's RAM model")
        elif kind in ("AppleSiliconChip", "Raspberry"):
            parts.append(f"{hw.chip_part} power measured on the chip ({kind})")
    order = ("CPU", "GPU", "RAM")  # as read: processors first, the memory estimate last
    parts.sort(key=lambda p: next((i for i, k in enumerate(order) if p.startswith(k)), 1))
    return "; ".join(parts) or "no hardware codecarbon could measure"


def _tdp_source(model: str) -> str:
    """Whether codecarbon found the CPU in its TDP table or assumed a power per thread."""
    try:
        from codecarbon.core import cpu
        from codecarbon.core.hardware_cache import get_cached_tdp

        found = get_cached_tdp(cpu)._get_cpu_power_from_registry(model)
    except Exception:
        return model
    if found:
        return f"{model}, {found:g} W in codecarbon's CPU table"
    return (f"{model} is not in codecarbon's CPU table: {cpu.DEFAULT_POWER_PER_CORE} W per "
            "thread assumed")


def _gpu_interface() -> str:
    try:
        from codecarbon.core.gpu_nvidia import is_nvidia_system

        return "NVML (NVIDIA)" if is_nvidia_system() else "AMD SMI"
    except Exception:
        return "the GPU driver's counters"


def _version() -> str | None:
    try:
        from importlib.metadata import version

        return version("codecarbon")
    except Exception:
        return None
