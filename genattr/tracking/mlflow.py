"""MLflow tracker that never relies on global MLflow state or the current directory.

Why a wrapper instead of ``mlflow.start_run``: Hydra changes output dirs and SLURM
requeues jobs, so every call goes through an ``MlflowClient`` bound to an explicit,
absolute tracking URI; the run id is explicit so a requeued job resumes the same run;
metrics are converted to floats here so nothing is silently dropped; and MLflow 3's
``./mlruns`` file store (which now refuses to start) is rejected up front.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.exceptions import MlflowException

from genattr.tracking.base import RUN_STATUSES
from genattr.tracking.spool import Spool, is_transient
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

MAX_PARAM_VALUE_LEN = 6000
MAX_KEY_LEN = 250
PARAMS_PER_BATCH = 100  # MLflow's MAX_PARAMS_TAGS_PER_BATCH
METRICS_PER_BATCH = 1000  # MLflow's MAX_METRICS_PER_BATCH
PARENT_TAG = "mlflow.parentRunId"
#: MLflow 3's UI opens an experiment in its GenAI (traces) view unless told it holds training runs.
EXPERIMENT_KIND = "mlflow.experimentKind"
TRAINING_KIND = "custom_model_development"


def _walk(node: Any, prefix: str, sep: str, out: dict[str, str]) -> None:
    """Depth-first flattening; empty containers stay visible as ``{}``/``[]``."""
    if isinstance(node, Mapping):
        if not node and prefix:
            out[prefix] = "{}"
        for key, value in node.items():
            _walk(value, f"{prefix}{sep}{key}" if prefix else str(key), sep, out)
    elif isinstance(node, Sequence) and not isinstance(node, str | bytes):
        if not node and prefix:
            out[prefix] = "[]"
        for i, value in enumerate(node):
            _walk(value, f"{prefix}{sep}{i}" if prefix else str(i), sep, out)
    else:
        out[prefix] = "null" if node is None else str(node)


def flatten_params(cfg: Mapping[str, Any], sep: str = ".") -> dict[str, str]:
    """Flatten a config into ``{dotted.key: str}`` within MLflow's param limits.

    Dotted keys keep runs filterable (``model.lora.r = 64``). Over-long keys/values
    would fail a whole ``log_batch``, so they are truncated with a warning (the full
    config goes in as an artifact). Pass a plain container, e.g.
    ``OmegaConf.to_container(cfg, resolve=True)``, so interpolations resolve once.
    """
    raw: dict[str, str] = {}
    _walk(cfg, "", sep, raw)
    out: dict[str, str] = {}
    for key, value in raw.items():
        k, v = key, value
        if len(k) > MAX_KEY_LEN:
            log.warning("param key longer than %d chars truncated: %s...", MAX_KEY_LEN, k[:80])
            k = k[:MAX_KEY_LEN]
        if len(v) > MAX_PARAM_VALUE_LEN:
            log.warning(
                "param %r has %d chars; truncated to %d (full value is in the config artifact)",
                k,
                len(v),
                MAX_PARAM_VALUE_LEN,
            )
            v = v[:MAX_PARAM_VALUE_LEN]
        if k in out:
            log.warning("param key %r collides after truncation; keeping the first value", k)
            continue
        out[k] = v
    return out


def to_float(key: str, value: Any) -> float:
    """Convert tensors / numpy scalars to ``float``; refuse anything non-numeric loudly.

    Other MLflow integrations drop such values silently (ecosystem pain point 18);
    strings are refused even when they look numeric, because they signal a bug.
    """
    if isinstance(value, str | bytes):
        raise TypeError(f"metric {key!r} must be numeric, got {type(value).__name__} {value!r}")
    try:
        return float(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"metric {key!r} must be a numeric scalar, got {type(value).__name__}") from exc


def _context_tags() -> dict[str, str]:
    """User/source/git tags that ``mlflow.start_run`` would add but the client API does not."""
    try:
        from mlflow.tracking.context.registry import resolve_tags

        return {k: str(v) for k, v in resolve_tags().items()}
    except Exception as exc:  # noqa: BLE001 - context tags are a nicety, never fatal
        log.debug("MLflow context tags unavailable: %s", exc)
        return {}


def _sqlite_path(uri: str) -> str | None:
    """Database path of a ``sqlite:///...`` URI, or ``None`` for in-memory databases."""
    rest = uri.split("://", 1)[1]
    rest = rest.split("?", 1)[0]
    if not rest.startswith("/") or rest in ("/", "/:memory:"):
        return None
    return rest[1:]


def check_tracking_uri(uri: str) -> str:
    """Reject backends that break on current MLflow or depend on the working directory.

    The file store (a bare path or ``file:`` URI) raises on MLflow >= 3.13, and a
    relative sqlite path lands inside whatever directory Hydra chose for the job.
    """
    scheme = urlparse(uri).scheme.lower()
    if uri in ("databricks", "databricks-uc"):
        return uri
    if scheme in ("", "file") or len(scheme) == 1:  # one letter: a Windows drive
        raise ConfigError(
            f"tracking URI {uri!r} is an MLflow file store, which current MLflow refuses; "
            "use an absolute sqlite URI such as 'sqlite:////abs/path/mlflow.db' or an http(s) server"
        )
    if scheme.startswith("sqlite"):
        path = _sqlite_path(uri)
        if path is not None and not path.startswith("/"):
            raise ConfigError(
                f"sqlite tracking URI {uri!r} is relative to the working directory; use four "
                "slashes and an absolute path, e.g. 'sqlite:////abs/path/mlflow.db'"
            )
    return uri


def _artifact_uri(location: str) -> str:
    """Turn a local path or ``file:`` URI into an absolute ``file://`` URI; keep remote ones."""
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(parsed.path).resolve().as_uri()
    if parsed.scheme == "" or len(parsed.scheme) == 1:
        return Path(location).expanduser().resolve().as_uri()
    return location


class MLflowTracker:
    """Tracker backed by an ``MlflowClient`` with an explicit URI (see module docstring).

    ``enabled=False`` (non-zero ranks) turns every method into a no-op and touches no
    database. Nothing is opened until ``start``/``ensure_experiment``, so building the
    object from config is free. With a sqlite URI and no ``artifact_location``,
    artifacts go next to the database (``<db dir>/artifacts``) instead of ``./mlruns``.

    An outage never stops training: every call is retried ``retries`` times with exponential
    backoff from ``backoff_s``; one that still fails with a transient error goes, with every
    later call, into a spool (:mod:`genattr.tracking.spool`, a file in the run's folder once
    :meth:`attach_spool` names it), which is replayed in order as soon as the server answers
    again, and once more at :meth:`end` for up to ``outage_patience_s`` seconds.

    A resumed run never gets a per-stage metric step twice: :meth:`start` with a ``run_id`` reads which (key, step)
    values the run already has, and a value logged with an explicit ``step`` at one of those steps is not sent again
    (the first one stays; MLflow cannot delete a value). Run-level values (no ``step``: the final metrics of a
    report) are always sent, so the latest one is the completed report's. An attempt killed after logging some
    steps of a stage that its resumed attempt then redoes (``resume=auto`` continues after the last checkpoint)
    would otherwise leave two values at each of them. Within one attempt nothing is filtered.
    """

    def __init__(
        self,
        tracking_uri: str,
        experiment: str = "genattr",
        artifact_location: str | None = None,
        enabled: bool = True,
        log_system_metrics: bool = False,
        retries: int = 2,
        backoff_s: float = 1.0,
        outage_patience_s: float = 600.0,
        request_timeout_s: float = 30.0,
    ) -> None:
        """Validate the URI eagerly so a bad config fails before training starts."""
        self.tracking_uri = check_tracking_uri(tracking_uri)
        self.experiment = experiment
        self.enabled = enabled
        self.log_system_metrics = log_system_metrics
        self._db_path = _sqlite_path(tracking_uri) if tracking_uri.startswith("sqlite") else None
        if artifact_location is None and self._db_path is not None:
            artifact_location = str(Path(self._db_path).parent / "artifacts")
        if urlparse(tracking_uri).scheme in ("http", "https") and artifact_location:
            if urlparse(artifact_location).scheme in ("", "file"):
                # a tracking server stores artifacts itself (`mlflow server --artifacts-destination`,
                # see `make mlflow-server`): a local path here would only exist on the submitting host
                log.debug(
                    "tracking server %s: artifact_location %s left to the server", tracking_uri, artifact_location
                )
                artifact_location = None
        self.artifact_location = _artifact_uri(artifact_location) if artifact_location else None
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self._client: MlflowClient | None = None
        self._monitor: Any = None
        self.retries, self.backoff_s = int(retries), float(backoff_s)
        self.outage_patience_s, self.request_timeout_s = float(outage_patience_s), float(request_timeout_s)
        self.spool = Spool()
        self._outage_since: float | None = None
        self._next_flush = 0.0
        self._flush_wait = self.backoff_s
        #: (key, step) of every value a resumed run had before this attempt, or delivered from its spool
        self._earlier_steps: set[tuple[str, int]] = set()
        self._earlier_ops: set[int] = set()  # id() of the spooled calls an earlier attempt left
        self._skipped = 0

    @property
    def client(self) -> MlflowClient:
        """Client created on first use; creating the sqlite folder first, which MLflow won't."""
        if self._client is None:
            if self._db_path is not None:
                Path(self._db_path).parent.mkdir(parents=True, exist_ok=True)
            if urlparse(self.tracking_uri).scheme in ("http", "https"):
                # MLflow's own retries would block a training step for minutes during an outage; ours spool
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
                os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(self.request_timeout_s)))
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        return self._client

    def ensure_experiment(self) -> str | None:
        """Get or create the experiment once (also callable from a multirun-start hook).

        Parallel jobs may race to create it; the loser re-fetches instead of failing.
        """
        if not self.enabled:
            return None
        if self.experiment_id is not None:
            return self.experiment_id
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is None:
            try:
                self.experiment_id = self.client.create_experiment(
                    self.experiment, artifact_location=self.artifact_location, tags={EXPERIMENT_KIND: TRAINING_KIND}
                )
                return self.experiment_id
            except MlflowException:
                exp = self.client.get_experiment_by_name(self.experiment)
                if exp is None:
                    raise
        if exp.lifecycle_stage == "deleted":
            raise ConfigError(
                f"MLflow experiment {self.experiment!r} is deleted; restore it "
                "(mlflow experiments restore) or pick another tracking.experiment"
            )
        if self.artifact_location and exp.artifact_location != self.artifact_location:
            log.warning(
                "experiment %r already stores artifacts at %s, not %s",
                self.experiment,
                exp.artifact_location,
                self.artifact_location,
            )
        self.experiment_id = exp.experiment_id
        return self.experiment_id

    def _require_run(self) -> str:
        """Fail clearly when logging before ``start`` instead of an MLflow 404."""
        if self.run_id is None:
            raise RuntimeError("MLflowTracker.start() must be called before logging")
        return self.run_id

    # -- the calls, each through the spool ----------------------------------------------------------
    def attach_spool(self, path: str | Path) -> None:
        """Keep undelivered calls in ``path`` (the run's folder), replaying what an earlier process left there."""
        earlier = Spool(path)
        self._earlier_ops = {id(op) for op in earlier.ops}
        for op in self.spool.ops:
            earlier.append(op)
        self.spool = earlier
        if len(self.spool):
            log.warning("%d tracking calls of an earlier attempt wait in %s; replaying them", len(self.spool), path)

    def start(
        self,
        *,
        run_name: str,
        tags: Mapping[str, str],
        params: Mapping[str, Any],
        run_id: str | None = None,
        parent_run_id: str | None = None,
    ) -> str | None:
        """Create a run or resume ``run_id``; params may be nested (they are flattened).

        With the server down the run is created when it comes back (``run_id`` stays ``None`` until then).
        """
        if not self.enabled:
            return None
        all_tags = {k: str(v) for k, v in tags.items()}
        if parent_run_id:
            all_tags[PARENT_TAG] = parent_run_id
        op = {"op": "start", "run_name": run_name, "tags": all_tags, "params": flatten_params(params), "run_id": run_id}
        if len(self.spool) and self.spool.ops[0]["op"] == "start":
            # an earlier attempt never reached the server: this start opens the run its spooled calls belong to
            self.spool.drop_first(1)
        # before any call an earlier (killed) attempt spooled: sent first, those would find no run and be dropped
        self._call(op, first=True)
        if self.log_system_metrics and self.run_id is not None:
            self._start_system_metrics(resume=run_id is not None)
        return self.run_id

    def _start_now(self, run_name: str, tags: dict[str, str], params: dict[str, str], run_id: str | None) -> None:
        experiment_id = self.ensure_experiment()
        if run_id is None:
            run = self.client.create_run(experiment_id or "0", tags={**_context_tags(), **tags}, run_name=run_name)
            self.run_id = run.info.run_id
        else:
            params = self._resume(run_id, params)
            self._log_batch(tags=[RunTag(k, v) for k, v in tags.items()])
        self._log_batch(params=[Param(k, v) for k, v in params.items()])

    def _resume(self, run_id: str, flat: dict[str, str]) -> dict[str, str]:
        """Reopen ``run_id`` and return only the params it does not have yet.

        MLflow params are immutable: re-logging a key with a new value raises, so
        existing keys are skipped (with a warning when the value changed).
        """
        run = self.client.get_run(run_id)  # raises if unknown
        existing = run.data.params
        self.run_id = run_id
        for key in run.data.metrics:
            self._earlier_steps |= {(key, int(m.step)) for m in self.client.get_metric_history(run_id, key)}
        self.client.update_run(run_id, status="RUNNING")
        for key in [k for k in flat if k in existing and existing[k] != flat[k]]:
            log.warning(
                "resumed run keeps param %r=%r; new value %r not logged",
                key,
                existing[key],
                flat[key],
            )
        return {k: v for k, v in flat.items() if k not in existing}

    def _log_batch(self, params: Sequence[Param] = (), tags: Sequence[RunTag] = ()) -> None:
        """Send params/tags in chunks of 100, MLflow's per-request limit."""
        run_id = self._require_run()
        for i in range(0, len(params), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=list(params[i : i + PARAMS_PER_BATCH]))
        for i in range(0, len(tags), PARAMS_PER_BATCH):
            self.client.log_batch(run_id, tags=list(tags[i : i + PARAMS_PER_BATCH]))

    def _send(self, op: dict[str, Any]) -> None:
        """Perform one call (first attempt or replay)."""
        kind = op["op"]
        if kind == "start":
            self._start_now(op["run_name"], op["tags"], op["params"], op["run_id"])
        elif kind == "metrics":
            entries = [Metric(k, float(v), int(ts), int(step)) for k, v, ts, step in op["metrics"]]
            if op.get("once", True):
                entries = self._not_logged_before(entries)
            for i in range(0, len(entries), METRICS_PER_BATCH):
                self.client.log_batch(self._require_run(), metrics=entries[i : i + METRICS_PER_BATCH])
            if id(op) in self._earlier_ops:  # an earlier attempt's call: its steps are now the run's
                self._earlier_steps |= {(e.key, e.step) for e in entries}
        elif kind == "tags":
            self._log_batch(tags=[RunTag(k, v) for k, v in op["tags"].items()])
        elif kind == "artifact":
            local = Path(op["path"])
            if local.is_dir():
                self.client.log_artifacts(self._require_run(), str(local), op["artifact_path"])
            else:
                self.client.log_artifact(self._require_run(), str(local), op["artifact_path"])
        elif kind == "dict":
            self.client.log_dict(self._require_run(), op["obj"], op["artifact_file"])
        elif kind == "end":
            self.client.set_terminated(self._require_run(), status=op["status"])
        else:
            raise ValueError(f"unknown tracking call {kind!r} in the spool")

    def _not_logged_before(self, entries: list[Metric]) -> list[Metric]:
        """``entries`` less the steps an earlier attempt logged (see the class docstring)."""
        fresh = [e for e in entries if (e.key, e.step) not in self._earlier_steps]
        if len(fresh) < len(entries):
            if not self._skipped:
                first = next(e for e in entries if (e.key, e.step) in self._earlier_steps)
                log.warning(
                    "resumed MLflow run %s already has %s at step %d (logged by an attempt that was stopped before "
                    "its next checkpoint); values at steps the run already has are not logged twice",
                    self.run_id,
                    first.key,
                    first.step,
                )
            self._skipped += len(entries) - len(fresh)
        return fresh

    def _call(self, op: dict[str, Any], *, first: bool = False) -> None:
        """Send ``op`` now (retrying transient failures), or spool it behind earlier undelivered calls (in front
        of them with ``first``: a start, which opens the run they go into)."""
        if not first and len(self.spool) and not self.flush():
            self.spool.append(op)
            return
        for attempt in range(self.retries + 1):
            try:
                self._send(op)
                return
            except Exception as exc:
                if not is_transient(exc):
                    raise
                if attempt == self.retries:
                    self._went_down(exc)
                    if first:
                        self.spool.ops.insert(0, op)
                        self.spool.drop_first(0)  # rewrites the file with ``op`` first
                    else:
                        self.spool.append(op)
                    return
                time.sleep(self.backoff_s * 2**attempt)

    def _went_down(self, exc: BaseException) -> None:
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            where = self.spool.path or "memory"
            log.warning(
                "MLflow at %s is unreachable (%s); training goes on and tracking calls wait in %s until it is back",
                self.tracking_uri,
                str(exc).splitlines()[0][:200],
                where,
            )
        self._next_flush = time.monotonic() + self._flush_wait
        self._flush_wait = min(self._flush_wait * 2, 60.0)

    def flush(self, patience_s: float = 0.0) -> bool:
        """Replay the spooled calls in order; wait up to ``patience_s`` for the server. True when none is left."""
        deadline = time.monotonic() + patience_s
        while len(self.spool):
            now = time.monotonic()
            if now < self._next_flush:
                if now >= deadline:
                    return False
                time.sleep(min(self._next_flush, deadline) - now)
                continue
            op = self.spool.ops[0]
            try:
                self._send(op)
            except Exception as exc:
                if not is_transient(exc):
                    log.error("spooled tracking call %s failed for good and is dropped: %s", op["op"], exc)
                    self.spool.drop_first(1)
                    continue
                self._went_down(exc)
                continue
            self.spool.drop_first(1)
        if self._outage_since is not None:
            log.warning(
                "MLflow at %s answers again after %.0f s; every spooled call was delivered",
                self.tracking_uri,
                time.monotonic() - self._outage_since,
            )
            self._outage_since, self._flush_wait = None, self.backoff_s
        return True

    def _start_system_metrics(self, resume: bool) -> None:
        """CPU/GPU/disk sampling thread; a missing optional dependency only warns."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import (
                SystemMetricsMonitor,
            )

            self._monitor = SystemMetricsMonitor(
                self._require_run(),
                resume_logging=resume,
                tracking_uri=self.tracking_uri,
            )
            self._monitor.start()
        except (ImportError, TypeError, OSError, MlflowException) as exc:
            # psutil missing, or an MLflow whose monitor has no tracking_uri argument
            log.warning("system metrics disabled: %s", exc)
            self._monitor = None

    def set_tags(self, tags: Mapping[str, str]) -> None:
        """Add tags after start (e.g. the SLURM job id known only later)."""
        if self.enabled:
            self._call({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log metrics at ``step``; values are converted to float, NaN is allowed."""
        if not self.enabled:
            return
        ts = int(time.time() * 1000)
        entries = [[k, to_float(k, v), ts, step or 0] for k, v in metrics.items()]
        # per-stage values (an explicit step) are logged once per step; run-level values (no step: the final
        # metrics) always, so that a run stopped early and resumed ends with the values of its completed report
        self._call({"op": "metrics", "metrics": entries, "once": step is not None})

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        """Upload a file, or a folder's contents (e.g. ``.hydra/``), under ``artifact_path``."""
        if not self.enabled:
            return
        local = Path(path)
        if not local.exists():
            raise FileNotFoundError(f"artifact {local} does not exist")
        self._call({"op": "artifact", "path": str(local.resolve()), "artifact_path": artifact_path})

    def log_dict(self, obj: dict[str, Any], artifact_file: str) -> None:
        """Store ``obj`` as JSON or YAML depending on ``artifact_file``'s extension."""
        if self.enabled:
            self._call({"op": "dict", "obj": obj, "artifact_file": artifact_file})

    def end(self, status: str = "FINISHED") -> None:
        """Stop system metrics and mark the run terminated, waiting up to ``outage_patience_s`` for a server that
        is down; what still cannot be delivered stays in the spool, with the command that replays it."""
        if status not in RUN_STATUSES:
            raise ValueError(f"status must be one of {RUN_STATUSES}, got {status!r}")
        if not self.enabled or (self.run_id is None and not len(self.spool)):
            return
        if self._monitor is not None:
            self._monitor.finish()
            self._monitor = None
        self._call({"op": "end", "status": status})
        # a finished run waits for the server; a killed one (preemption gives it seconds) leaves the rest to its
        # resumed attempt, which replays the spool first
        patience = self.outage_patience_s if status == "FINISHED" else 0.0
        if len(self.spool) and not self.flush(patience):
            log.error(
                "MLflow at %s stayed unreachable; %d tracking calls are kept in %s: once the server is up, "
                "`python -m genattr.tracking.replay %s` delivers them (resuming the run does too)",
                self.tracking_uri,
                len(self.spool),
                self.spool.path,
                self.spool.path.parent if self.spool.path else "<run dir>",
            )

    def describe(self) -> str:
        """Where the run is and how to open it, for the job log and the sweep summary."""
        if not self.enabled:
            return "MLflow tracking disabled in this process (non-zero rank)"
        if len(self.spool):
            return f"MLflow at {self.tracking_uri} unreachable: {len(self.spool)} calls wait in {self.spool.path}"
        where = (
            f"MLflow run {self.run_id} in experiment {self.experiment!r} "
            f"(id {self.experiment_id}) at {self.tracking_uri}"
        )
        if urlparse(self.tracking_uri).scheme in ("http", "https"):
            base = self.tracking_uri.rstrip("/")
            return f"{where}; open {base}/#/experiments/{self.experiment_id}/runs/{self.run_id}"
        return f"{where}; view with: mlflow ui --backend-store-uri {self.tracking_uri}"
