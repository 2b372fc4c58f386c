"""The instance a load run works on: made before the run, checked after it.

``prepare_instance`` migrates a fresh instance with ``oncoscope db upgrade`` (the real command, as
an operator would) and seeds one doctor account per simulated user plus a large history;
``wait_for_analyses`` asks the database, after the run, whether every image uploaded during it
was analysed.
"""

from __future__ import annotations

import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import func, select

from ..config import Settings
from ..store.db import make_engine
from ..store.models import Analysis, Case, CaseImage
from .fixtures import DOCTOR_PASSWORD, doctor_email, seed_instance
from .processes import instance_env, oncoscope_cmd


@dataclass
class Instance:
    home: Path
    database_url: str
    env: dict
    accounts: list[tuple[str, str]]
    seeded: dict
    first_run_image_id: int  # images above this id are uploads of the run
    first_run_case_id: int


def prepare_instance(home: Path, database_url: str | None = None, *, users: int = 50, patients: int = 10_000,
                     analyses: int = 50_000, seed: int = 0, extra_env: dict | None = None) -> Instance:
    """Migrate with ``oncoscope db upgrade`` and seed: one doctor account per simulated user, patients
    spread over them, a case history. Returns what the run and the final check need."""
    home = Path(home).resolve()
    home.mkdir(parents=True, exist_ok=True)
    database_url = database_url or f"sqlite:///{home / 'oncoscope.db'}"  # never a DATABASE_URL from the environment
    env = instance_env(home, database_url, extra_env)
    p = subprocess.run([*oncoscope_cmd(), "db", "upgrade"], env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeError(f"oncoscope db upgrade failed: {p.stdout[-1000:]}{p.stderr[-2000:]}")
    st = Settings.from_env(home=home, database_url=database_url).prepare()
    seeded = seed_instance(st, max(patients, users), analyses, seed=seed, n_doctors=users)
    eng = make_engine(st.database_url)
    try:
        with eng.connect() as c:
            img_max = c.scalar(select(func.coalesce(func.max(CaseImage.id), 0)))
            case_max = c.scalar(select(func.coalesce(func.max(Case.id), 0)))
    finally:
        eng.dispose()
    return Instance(home, st.database_url, env, [(doctor_email(i), DOCTOR_PASSWORD) for i in range(users)],
                    seeded, img_max, case_max)


def wait_for_analyses(database_url: str, first_run_image_id: int, timeout_s: float = 120) -> dict:
    """Wait (bounded) until every image uploaded during the run has a finished analysis; report them."""
    eng = make_engine(database_url)
    t0 = time.monotonic()
    try:
        while True:
            with eng.connect() as c:
                rows = c.execute(select(CaseImage.id, CaseImage.case_id, CaseImage.created_at, Analysis.job_status,
                                        Analysis.result_status, Analysis.finished_at)
                                 .outerjoin(Analysis, Analysis.image_id == CaseImage.id)
                                 .where(CaseImage.id > first_run_image_id)).all()
            pending = [r for r in rows if r.job_status in ("queued", "running", "retried")]
            if not pending or time.monotonic() - t0 > timeout_s:
                break
            time.sleep(0.5)
    finally:
        eng.dispose()
    done = [r for r in rows if r.job_status == "done"]
    secs = [(r.finished_at - r.created_at).total_seconds() for r in done if r.finished_at and r.created_at]
    results: dict[str, int] = {}
    for r in done:
        results[r.result_status or "none"] = results.get(r.result_status or "none", 0) + 1
    return {"images": len(rows), "analysed": len(done), "pending": len(pending),
            "failed": sum(1 for r in rows if r.job_status == "failed"),
            "no_job": sum(1 for r in rows if r.job_status is None),
            "cases": sorted({r.case_id for r in rows}), "results": results,
            "waited_s": round(time.monotonic() - t0, 1),
            "upload_to_result_s": secs}
