"""``oncoscope bench --load``: simulated doctors against the real server on loopback.

Target (issue): 50 concurrent simulated users (browse, search, upload, review) for 2 minutes
against ``oncoscope serve``: 0 errors, p95 page time <= 300 ms, every upload analysed.

``run_load`` puts the pieces together and ``summarize`` / ``format_report`` turn the recording
into the report (both write the same report dict, so they live here together):

1. ``instance.prepare_instance``: a fresh instance folder, ``oncoscope db upgrade``, one doctor
   account per simulated user plus a large seeded history (``fixtures.seed_instance``).
2. ``processes.Server``: the real ``oncoscope serve`` in a subprocess (waitress + analysis worker
   pool), started, health-checked, measured (peak RSS, CPU) and always stopped; in scaled-out mode
   also ``processes.WorkerProcess`` on a Redis queue.
3. ``users.run_users``: one thread per simulated doctor (``users.SimUser``), each a small browser
   (``browser.Browser``) recording every request into one ``browser.Recorder``.
4. ``instance.wait_for_analyses``: after the deadline, the database is asked (bounded wait) until
   every uploaded image has a finished analysis; uploads not analysed (or lost) count as errors.

The pieces are separate so fault scenarios (kill a worker, stop the database) can reuse them.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from sqlalchemy.engine import make_url

from .browser import ASSET, LOGIN, PAGE, POLL, Recorder
from .fixtures import percentile, smear_images
from .instance import prepare_instance, wait_for_analyses
from .processes import Server, WorkerProcess, clear_queue, scratch_database, sigterm_as_exit
from .users import run_users


# ----------------------------------------------------------------------------- machine and server CPU
def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat (None elsewhere)."""
    try:
        vals = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)  # idle + iowait
    return (sum(vals[:8]) - idle) / tick, sum(vals[:8]) / tick


def cpu_usage(before: dict, after: dict, seconds: float) -> dict:
    """Cores used during a run by the whole machine, the server and the bench's own process
    (``before``/``after``: {"machine": machine_cpu_s(), "server": cpu s, "bench": process_time})."""
    out = {"cpus": os.cpu_count()}
    if before.get("machine") and after.get("machine") and seconds > 0:
        out["machine_busy_cores"] = round((after["machine"][0] - before["machine"][0]) / seconds, 2)
    if before.get("server") is not None and after.get("server") is not None and seconds > 0:
        out["server_cores"] = round((after["server"] - before["server"]) / seconds, 2)
    if seconds > 0:
        out["bench_client_cores"] = round((after["bench"] - before["bench"]) / seconds, 2)
    if "machine_busy_cores" in out and "server_cores" in out:
        # everything else: the database server (PostgreSQL), other people's work, the bench itself
        out["other_cores"] = round(out["machine_busy_cores"] - out["server_cores"] - out["bench_client_cores"], 2)
    return out


# ----------------------------------------------------------------------------- report
def mask_url(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def _stats(values: list[float]) -> dict:
    if not values:
        return {"count": 0, "p50": None, "p95": None, "p99": None, "max": None}
    return {"count": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95),
            "p99": percentile(values, 99), "max": round(max(values), 2)}


def summarize(rec: Recorder, check: dict, *, users: int, duration_s: float, database_url: str, server: Server | None,
              page_p95_target_ms: float = 300.0, extra: dict | None = None) -> dict:
    elapsed = rec.elapsed_s or max((s.t for s in rec.samples), default=0.0)
    by_kind: dict[str, list[float]] = {}
    by_name: dict[str, list[float]] = {}
    for s in rec.samples:
        if s.status:
            by_kind.setdefault(s.kind, []).append(s.ms)
            by_name.setdefault(s.name, []).append(s.ms)
    errors = list(rec.errors)
    client_cases = set(rec.uploads)
    db_cases = set(check["cases"])
    lost = sorted(client_cases - db_cases)
    if lost:
        errors.append(f"{len(lost)} accepted uploads have no image in the database (cases {lost[:10]})")
    not_analysed = check["images"] - check["analysed"]
    if not_analysed:
        errors.append(f"{not_analysed} uploaded images not analysed ({check['pending']} still pending after "
                      f"{check['waited_s']} s, {check['failed']} failed, {check['no_job']} without a job)")
    seen = [u["t_result"] - u["t_post"] for u in rec.uploads.values() if u["t_result"] is not None]
    page = _stats(by_kind.get(PAGE, []))
    ramp = rec.ramp_s
    steady = [s.ms for s in rec.samples if s.kind == PAGE and s.status and s.t >= ramp + 5]
    status_counts: dict[str, int] = {}
    for s in rec.samples:
        status_counts[str(s.status)] = status_counts.get(str(s.status), 0) + 1
    rep = {
        "users": users, "duration_s": duration_s, "elapsed_s": round(elapsed, 1),
        "database": {"dialect": database_url.split(":", 1)[0].split("+", 1)[0], "url": mask_url(database_url)},
        "requests": len(rec.samples), "requests_per_s": round(len(rec.samples) / elapsed, 1) if elapsed else None,
        "statuses": status_counts,
        "errors": {"count": len(errors), "first": errors[:10]},
        "page_ms": page,
        # without the sign-in ramp (all users signing in, argon2 on the server) and 5 s after it
        "page_ms_after_ramp": dict(_stats(steady), from_s=round(ramp + 5, 1)),
        "login_ms": _stats(by_kind.get(LOGIN, [])),
        "status_poll_ms": _stats(by_kind.get(POLL, [])),
        "asset_ms": _stats(by_kind.get(ASSET, [])),
        "actions": {n: {"count": len(v), "p50": percentile(v, 50), "p95": percentile(v, 95), "max": round(max(v), 1)}
                    for n, v in sorted(by_name.items())},
        "uploads": check["images"], "uploads_accepted_by_clients": len(client_cases),
        "uploads_analysed": check["analysed"], "analysis_results": check["results"],
        # as the doctor sees it: upload POST sent -> the status poll (0.7 s, then every 1 s, like the page) says done
        "upload_to_result_s": {k: v for k, v in _stats(seen).items() if k != "p99"},
        # server timestamps (1 s resolution): image row created -> analysis finished
        "upload_to_result_db_s": {k: v for k, v in _stats(check["upload_to_result_s"]).items() if k != "p99"},
        "signed": rec.signed, "keepalive_reconnects": rec.reconnects,
        "server": {"peak_rss_mb": server.peak_rss_mb if server else None, "cpu_s": server.cpu_s if server else None,
                   "cpu_ms_per_request": round(1e3 * server.cpu_s / len(rec.samples), 1)
                   if server and server.cpu_s and rec.samples else None,
                   **(server.log_problems() if server else {})},
        "load_average": None, "cpu_count": os.cpu_count(),
    }
    if extra:
        rep.update(extra)
    rep["targets_met"] = {
        "errors_0": len(errors) == 0,
        f"page_p95_le_{page_p95_target_ms:g}ms": page["p95"] is not None and page["p95"] <= page_p95_target_ms,
        "all_uploads_analysed": check["images"] == check["analysed"] and not lost and check["images"] > 0,
    }
    rep["all_targets_met"] = all(rep["targets_met"].values())
    return rep


# ----------------------------------------------------------------------------- the whole run
def run_load(users: int = 50, duration_s: float = 120, database_url: str | None = None, think_s=(0.5, 2.0),
             seed: int = 0, extra_env: dict | None = None, *, patients: int = 10_000, analyses: int = 50_000,
             server_threads: int | None = None, ramp_s: float | None = None, mix: dict | None = None,
             analysis_wait_s: float = 120, keep_home: bool = False, home: Path | None = None,
             progress=None, queue_url: str | None = None, workers: int = 2) -> dict:
    """Fresh instance + real server + ``users`` simulated doctors for ``duration_s``; returns the report.
    ``database_url``: None = SQLite in the instance; PostgreSQL gets its own scratch database.
    ``queue_url``: scaled-out mode: the server hands analyses to Redis and ``workers`` separate
    ``oncoscope worker`` processes run them."""
    say = progress or (lambda _msg: None)
    if queue_url:
        extra_env = dict(extra_env or {}, ONCOSCOPE_QUEUE_URL=queue_url)
    worker_procs: list = []
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="oncoscope-load-")
        home = Path(tmp.name)
    server = None
    try:
        with sigterm_as_exit(), scratch_database(database_url) as url:
            say(f"seeding {max(patients, users)} patients, {analyses} analyses, {users} doctors in {home}")
            inst = prepare_instance(home, url, users=users, patients=patients, analyses=analyses, seed=seed,
                                    extra_env=extra_env)
            images = smear_images(16, "PNG", first_seed=seed)
            server = Server(inst.env, threads=server_threads)
            say(f"starting oncoscope serve on {server.base}")
            server.start()
            if queue_url:
                clear_queue(queue_url)
                worker_procs = [WorkerProcess(inst.env, home / f"worker-{i}.log").start() for i in range(workers)]
                say(f"started {workers} oncoscope worker processes on {queue_url}")
            load_before = os.getloadavg()
            server.sample()
            cpu_before = {"machine": machine_cpu_s(), "server": server.cpu_s, "bench": time.process_time()}
            say(f"{users} users for {duration_s:g} s")
            rec = run_users(server.host, server.port, inst.accounts, duration_s, think_s=think_s, seed=seed,
                            images=images, ramp_s=ramp_s, mix=mix)
            load_after = os.getloadavg()
            server.sample()
            cpu_after = {"machine": machine_cpu_s(), "server": server.cpu_s, "bench": time.process_time()}
            say("waiting for the last analyses")
            check = wait_for_analyses(inst.database_url, inst.first_run_image_id, analysis_wait_s)
            server.sample()
            server.stop()
            for w in worker_procs:
                w.stop()
            rep = summarize(rec, check, users=users, duration_s=duration_s, database_url=inst.database_url,
                            server=server, extra={"think_s": list(think_s), "seeded": inst.seeded,
                                                  "cpu": cpu_usage(cpu_before, cpu_after, rec.elapsed_s)})
            if cpu_before["server"] is not None and cpu_after["server"] is not None and rec.samples:
                # during the run only (not start-up or the final wait)
                rep["server"]["cpu_ms_per_request"] = round(
                    1e3 * (cpu_after["server"] - cpu_before["server"]) / len(rec.samples), 1)
            rep["queue"] = {"mode": "redis", "url": queue_url, "workers": workers} if queue_url else \
                {"mode": "in-process"}
            rep["load_average"] = {"before": [round(x, 2) for x in load_before],
                                   "after": [round(x, 2) for x in load_after]}
            if keep_home:
                rep["home"] = str(home)
            return rep
    finally:
        if server is not None:
            server.stop()
        for w in worker_procs:
            w.stop()
        if tmp is not None and not keep_home:
            tmp.cleanup()


def format_report(rep: dict) -> str:
    """A readable summary of ``run_load``'s report."""
    def ms(d):
        return "–" if not d or d.get("p95") is None else f"p50 {d['p50']:.0f} / p95 {d['p95']:.0f} / max {d['max']:.0f} ms"

    cpu = rep.get("cpu") or {}
    lines = [
        f"{rep['users']} users for {rep['duration_s']:g} s on {rep['database']['dialect']} "
        f"({rep['requests']} requests, {rep['requests_per_s']} req/s; load average before "
        f"{rep['load_average']['before'][0] if rep.get('load_average') else '?'}, after "
        f"{rep['load_average']['after'][0] if rep.get('load_average') else '?'} on {rep['cpu_count']} CPUs)",
        f"CPU cores busy during the run: machine {cpu.get('machine_busy_cores')}, server {cpu.get('server_cores')}, "
        f"bench client {cpu.get('bench_client_cores')}, everything else {cpu.get('other_cores')}",
        f"pages:        {ms(rep['page_ms'])} (p99 {rep['page_ms']['p99']} ms); "
        f"after the sign-in ramp: {ms(rep['page_ms_after_ramp'])}",
        f"sign-in POST: {ms(rep['login_ms'])}",
        f"status polls: {ms(rep['status_poll_ms'])}",
        f"images:       {ms(rep['asset_ms'])}",
        f"uploads:      {rep['uploads']} ({rep['uploads_analysed']} analysed; {rep['analysis_results']}), "
        f"upload to result p50 {rep['upload_to_result_s']['p50']} s / p95 {rep['upload_to_result_s']['p95']} s; "
        f"{rep['signed']} cases signed",
        f"server:       peak RSS {rep['server'].get('peak_rss_mb')} MB, CPU {rep['server'].get('cpu_s')} s "
        f"({rep['server'].get('cpu_ms_per_request')} ms per request), "
        f"{rep['server'].get('tracebacks', 0)} tracebacks, max queue depth {rep['server'].get('max_queue_depth', 0)}",
        f"errors:       {rep['errors']['count']}",
    ]
    lines += [f"  - {e}" for e in rep["errors"]["first"]]
    lines.append("slowest requests (p95):")
    worst = sorted(rep["actions"].items(), key=lambda kv: -kv[1]["p95"])[:8]
    lines += [f"  {n:<24} n={v['count']:<5} p50 {v['p50']:>7.1f}  p95 {v['p95']:>7.1f}  max {v['max']:>7.1f} ms"
              for n, v in worst]
    lines += [f"{'MET ' if ok else 'MISS'} {k}" for k, ok in rep["targets_met"].items()]
    return "\n".join(lines)
