"""Workers: claim a job, validate its files, train it in a child process, supervise it.

One worker trains one job at a time. While the child trains, the worker renews the job's
lease every ``poll_seconds``; a renewal that fails means the user cancelled or paused the job
(or another worker took it over), and the child is stopped at once. Checkpoints are written
atomically by the training loop, so stopping a child at any moment loses at most the steps
since the last one.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import threading
import time
from pathlib import Path
from typing import Any

from tunesmith.config import RunConfig
from tunesmith.errors import TunesmithError
from tunesmith.service import queue
from tunesmith.service.files import RESULTS_PURPOSE, add_file
from tunesmith.service.jobs import add_event
from tunesmith.service.objects import method_type
from tunesmith.service.plan import JobDataError, check_job_data, plan_run
from tunesmith.service.runner import (
    EXIT_SUPERSEDED,
    ChildArgs,
    child_main,
    error_code,
    read_outcome,
    results_csv,
)
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.tables import Job, StoredFile, now
from tunesmith.training.callbacks import read_metrics

log = logging.getLogger("tunesmith.service")
STOP_GRACE_S = 5.0


class Worker:
    """Takes jobs from the store until ``stop()``; ``run_forever`` is the loop."""

    def __init__(self, settings: ServiceSettings, store: Store | None = None) -> None:
        self.settings = settings
        self.store = store or Store(settings.url)
        self.id = queue.new_worker_id()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def run_forever(self) -> None:
        queue.release_dead_local_leases(self.store)
        log.info("worker %s started", self.id)
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except Exception:  # e.g. the database is briefly unreachable: try again later
                log.exception("worker %s", self.id)
                busy = False
            if not busy:
                self._stop.wait(self.settings.poll_seconds)
        log.info("worker %s stopped", self.id)

    def run_once(self) -> bool:
        """Claim and process one job; False when there was none."""
        claim = queue.claim_next(self.store, self.id, self.settings.lease_seconds)
        if claim is None:
            return False
        try:
            self._process(claim)
        except TunesmithError as err:
            queue.fail(self.store, claim.job_id, self.id, code=error_code(err), message=str(err),
                       param=getattr(err, "param", None))
        except Exception as err:  # a bug of ours must fail the job, not kill the worker
            log.exception("job %s", claim.job_id)
            queue.fail(self.store, claim.job_id, self.id, code="server_error",
                       message=f"internal error: {type(err).__name__}: {err}")
        return True

    # ------------------------------------------------------------------ stages

    def _process(self, claim: queue.Claim) -> None:
        if claim.status == "validating_files" and not self._validate(claim.job_id):
            return
        if claim.status != "running" and not queue.set_status(
                self.store, claim.job_id, self.id, "running",
                expect=("validating_files", "queued"), message="Fine-tuning job started",
                lease_expires_at=self._lease()):
            return
        self._train(claim.job_id)

    def _paths(self, job: Job) -> tuple[Path, Path | None]:
        files = self.settings.files_dir
        return (files / job.training_file,
                files / job.validation_file if job.validation_file else None)

    def _lease(self) -> float:
        return time.time() + self.settings.lease_seconds

    def _run_dir(self, job: Job) -> Path:
        return self.settings.runs_dir / job.id

    def _job(self, job_id: str) -> Job:
        with self.store.begin() as s:
            return s.get(Job, job_id)

    def _plan(self, job: Job, task: str) -> tuple[RunConfig, dict[str, Any]]:
        train_path, valid_path = self._paths(job)
        return plan_run(job_id=job.id, run_dir=self._run_dir(job), base_ref=job.base_ref,
                        train_path=train_path, valid_path=valid_path,
                        requested=job.hyperparameters, task=task, seed=job.seed,
                        max_eval_examples=self.settings.max_eval_examples,
                        energy=self.settings.energy)

    def _validate(self, job_id: str) -> bool:
        job = self._job(job_id)
        try:
            task = check_job_data(*self._paths(job), method_type(job.hyperparameters))
            _, hp = self._plan(job, task)
        except JobDataError as err:
            queue.fail(self.store, job_id, self.id, code=err.code or "invalid_training_file",
                       message=str(err), param=err.param)
            return False
        # a long validation may have outlived the lease: the CAS in set_status then fails,
        # because the job is another worker's now; otherwise the lease is extended
        return queue.set_status(self.store, job_id, self.id, "queued",
                                expect=("validating_files",), hyperparameters=hp, task=task,
                                message="Files validated, moving job to queued state",
                                lease_expires_at=self._lease())

    def _train(self, job_id: str) -> None:
        job = self._job(job_id)
        # the hyperparameters are resolved numbers since validation: planning again gives
        # the run that was reported, with the learning rate the multiplier asked for
        cfg, _ = self._plan(job, job.task or "generation")
        args = ChildArgs(database_url=self.store.url, job_id=job.id, worker_id=self.id,
                         output_model=job.output_model, config=cfg.model_dump(mode="json"),
                         home=str(self.settings.home), torch_threads=self.settings.torch_threads)
        ctx = multiprocessing.get_context("spawn")
        reader, writer = ctx.Pipe(duplex=False)
        child = ctx.Process(target=child_main, args=(args, reader), daemon=True,
                            name=f"tunesmith-{job.id}")
        child.start()
        reader.close()  # only the child holds the read end: it sees EOF when we die
        try:
            how = self._supervise(job.id, child)
        finally:
            writer.close()
        self._conclude(job, how, child.exitcode)

    def _supervise(self, job_id: str, child: Any) -> str:
        """'exited', 'stopped' (cancelled, paused or taken over) or 'shutdown'."""
        while True:
            child.join(self.settings.poll_seconds)
            if child.exitcode is not None:
                return "exited"
            if self._stop.is_set():
                _terminate(child)
                return "shutdown"
            if not queue.renew(self.store, job_id, self.id, self.settings.lease_seconds):
                _terminate(child)
                return "stopped"

    def _conclude(self, job: Job, how: str, exitcode: int | None) -> None:
        if how == "shutdown":
            queue.release(self.store, job.id, self.id, "The worker shut down; the job "
                          "resumes from its last checkpoint when a worker is free")
            return
        if how == "stopped" or exitcode == EXIT_SUPERSEDED:
            queue.release(self.store, job.id, self.id)
            return
        outcome = read_outcome(self._run_dir(job))
        if exitcode == 0 and outcome and outcome.get("ok"):
            self._succeed(job, outcome)
        elif outcome and not outcome.get("ok"):
            queue.fail(self.store, job.id, self.id, code=outcome["code"],
                       message=outcome["message"], param=outcome.get("param"))
        else:
            queue.fail(self.store, job.id, self.id, code="training_process_died",
                       message=f"the training process ended with exit code {exitcode} "
                       "(a negative code is the signal that killed it, e.g. -9 when the "
                       "machine ran out of memory); see console.log in the run directory")

    def _succeed(self, job: Job, outcome: dict[str, Any]) -> None:
        run_dir = self._run_dir(job)
        results = add_results_files(self.store, self.settings.files_dir, job.org, run_dir)
        with self.store.begin() as s:
            if outcome.get("rejected"):
                add_event(s, job.id, f"{outcome['rejected']} example(s) were left out of "
                          "training (too long or nothing to learn); see rejects.jsonl",
                          level="warn")
            for warning in outcome.get("warnings") or []:
                # e.g. the best model is the untrained start, or a one-class classifier
                add_event(s, job.id, f"Warning: {warning}", level="warn",
                          data={"warning": warning})
            tuned = outcome.get("tuned") or {}
            add_event(s, job.id, "Evaluation on held-out examples: " + json.dumps(
                {k: v for k, v in tuned.items() if not isinstance(v, dict)}),
                data={"evaluation": tuned})
            privacy = run_privacy(run_dir)
            if privacy is not None:
                add_event(s, job.id, privacy_message(privacy), data={"privacy": privacy})
            energy = run_energy(run_dir)
            if energy is not None:
                add_event(s, job.id, energy_message(energy), data={"energy": energy})
        done = queue.set_status(
            self.store, job.id, self.id, "succeeded", expect=("running",),
            message=f"New fine-tuned model created: {job.output_model}",
            result_files=[f.id for f in results], finished_at=now(), estimated_finish=None,
            worker_id=None, lease_expires_at=None, privacy=privacy, energy=energy)
        with self.store.begin() as s:
            if done:
                add_event(s, job.id, "The job has successfully completed")
            else:  # cancelled in the last instant: the results are not delivered
                for f in results:
                    s.delete(s.get(StoredFile, f.id))
                    (self.settings.files_dir / f.id).unlink(missing_ok=True)


def _run_results(run_dir: Path, key: str) -> Any:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text(encoding="utf-8")).get(key) if path.is_file() else None


def run_privacy(run_dir: Path) -> dict[str, Any] | None:
    """A private run's ``metrics.json["privacy"]`` (epsilon, delta, noise_multiplier,
    max_grad_norm, steps, accountant, ...), infinities as null; None for other runs."""
    privacy = _run_results(run_dir, "privacy")
    if not isinstance(privacy, dict):
        return None
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v
            for k, v in privacy.items()}


def run_energy(run_dir: Path) -> dict[str, Any] | None:
    """The run's ``metrics.json["energy"]`` (kWh, kg CO2e, seconds per phase and in total, the
    power method, the country); None when it was not measured (``energy.enabled: false``)."""
    energy = _run_results(run_dir, "energy")
    return energy if isinstance(energy, dict) else None


def energy_message(energy: dict[str, Any]) -> str:
    """E.g. 'energy: 0.0021 kWh, 0.00078 kg CO2e (USA grid); CPU power estimated ...'."""
    total = energy.get("total") or {}
    kwh, kg = total.get("kwh"), total.get("kg_co2e")
    if not isinstance(kwh, int | float) or not isinstance(kg, int | float):
        return f"energy: not measured ({total.get('error') or 'no figures'})"
    return (f"energy: {kwh:.3g} kWh, {kg:.3g} kg CO2e ({energy.get('country_iso_code')} "
            f"grid); {energy.get('method')}")


def privacy_message(privacy: dict[str, Any]) -> str:
    """E.g. 'differential privacy: epsilon 7.98 at delta 1e-05 (PRV accountant)'."""
    eps, delta = privacy.get("epsilon"), privacy.get("delta")
    spent = f"epsilon {eps:.2f}" if isinstance(eps, int | float) else "epsilon unbounded"
    at = f"{delta:.2g}" if isinstance(delta, int | float) else str(delta)
    return (f"differential privacy: {spent} at delta {at} "
            f"({str(privacy.get('accountant')).upper()} accountant)")


def add_results_files(store: Store, files_dir: Path, org: str, run_dir: Path
                      ) -> list[StoredFile]:
    """A finished job's result files in the store (OpenAI's ``result_files``): the per-step
    metrics (``step_metrics.csv``, first, as OpenAI's one result file), then the run's own
    evaluation report (``report.html``) when the run wrote one."""
    files = [add_file(store, files_dir, org, filename="step_metrics.csv",
                      purpose=RESULTS_PURPOSE,
                      content=results_csv(read_metrics(run_dir / "metrics.jsonl")))]
    report = run_dir / "report.html"
    if report.is_file():
        files.append(add_file(store, files_dir, org, filename="report.html",
                              purpose=RESULTS_PURPOSE, content=report.read_bytes()))
    return files


def _terminate(child: Any) -> None:
    child.terminate()
    child.join(STOP_GRACE_S)
    if child.exitcode is None:
        child.kill()
        child.join(STOP_GRACE_S)


def start_worker_thread(worker: Worker) -> threading.Thread:
    thread = threading.Thread(target=worker.run_forever, name="tunesmith-worker", daemon=True)
    thread.start()
    return thread

