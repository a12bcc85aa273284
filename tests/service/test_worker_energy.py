"""A finished job carries its run's energy and emissions (metrics.json["energy"]): in the job
object's ``energy`` field once it succeeded, and in an event."""

from __future__ import annotations

import json
from pathlib import Path

from tests.helpers import jsonl_bytes, review_rows
from tunesmith.service import ServiceSettings, Store, queue
from tunesmith.service.jobs import create_job, get_job, list_events
from tunesmith.service.schemas import JobCreate
from tunesmith.service.tables import Job, StoredFile
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
    settings = ServiceSettings(data_dir=tmp_path / "svc", home=test_home,
                               base_models={"tiny": str(tiny_model_dir)})
    store = Store(settings.url)
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    (settings.files_dir / "file-t").write_bytes(jsonl_bytes(review_rows(12)))
    with store.begin() as s:
        s.add(StoredFile(id="file-t", org="acme", filename="t.jsonl", purpose="fine-tune",
                         bytes=1, examples=12))
    job_id = create_job(store, settings, "acme", JobCreate(model="tiny",
                                                             training_file="file-t"))["id"]
    worker = Worker(settings, store)
    assert queue.claim_next(store, worker.id, lease_seconds=30).job_id == job_id
    assert queue.set_status(store, job_id, worker.id, "running", expect=("validating_files",))
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
