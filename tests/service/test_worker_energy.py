"""A finished job carries its run's energy and emissions (metrics.json["energy"]): in the job
object's ``energy`` field once it succeeded, and in an event."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import queued_job, start_job
from tunesmith.service.jobs import get_job, list_events
from tunesmith.service.tables import Job
from tunesmith.service.worker import Worker, energy_message

PHASE = {"kwh": 2e-4, "kg_co2e": 7.4e-5, "seconds": 9.5, "cpu_kwh": 6e-5, "gpu_kwh": 0.0,
         "ram_kwh": 1.4e-4, "method": "CPU power estimated from CPU load", "error": None}
ENERGY = {"training": PHASE, "evaluation": PHASE,
          "total": {**PHASE, "kwh": 4e-4, "kg_co2e": 1.48e-4, "seconds": 19.0},
          "method": "CPU power estimated from CPU load", "country_iso_code": "USA",
          "country_name": "United States", "region": None, "carbon_intensity_g_per_kwh": 369.5,
          "tracking_mode": "machine", "codecarbon_version": "3.3.2"}


def test_a_successful_job_reports_its_energy(tmp_path: Path, tiny_model_dir: Path,
                                             test_home: Path) -> None:
    settings, store, job_id = queued_job(tmp_path / "svc", tiny_model_dir, test_home)
    worker = Worker(settings, store)
    start_job(store, job_id, worker.id)
    assert get_job(store, "acme", job_id)["energy"] is None  # nothing before success
    run_dir = settings.runs_dir / job_id
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "train_loss": 1.0}\n')
    (run_dir / "metrics.json").write_text(json.dumps({"energy": ENERGY}))
    with store.begin() as s:
        job = s.get(Job, job_id)
    worker._succeed(job, {"ok": True, "tuned": {"n": 2, "accuracy": 0.5}})
    shown = get_job(store, "acme", job_id)
    assert shown["status"] == "succeeded" and shown["energy"] == ENERGY
    events = list_events(store, "acme", job_id, after=None, limit=50)["data"]
    said = [e for e in events if e["message"].startswith("energy:")]
    assert said[0]["message"] == ("energy: 0.0004 kWh, 0.000148 kg CO2e (USA grid); CPU power "
                                  "estimated from CPU load")
    assert said[0]["data"] == {"energy": ENERGY}


def test_an_unmeasured_run_says_why() -> None:
    failed = {**ENERGY, "total": {**ENERGY["total"], "kwh": None, "kg_co2e": None,
                                  "error": "training: codecarbon could not start"}}
    assert energy_message(failed) == "energy: not measured (training: codecarbon could not " \
                                     "start)"
