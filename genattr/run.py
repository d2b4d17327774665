"""``run(cfg)``: seed, context, build protocol + method, ``method.run``, report. Nothing else."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from genattr.config import (
    CONF_DIR,
    apply_cpu_profile,
    check_compatibility,
    explicit_override_keys,
    profile_in_use,
    register_resolvers,
    reject_unknown_additions,
)
from genattr.engine.accelerator import make_accelerator
from genattr.engine.checkpoint import Checkpointer
from genattr.methods.base import Report, RunContext
from genattr.tracking import sweep
from genattr.tracking.base import NullTracker, Tracker
from genattr.tracking.mlflow import flatten_params
from genattr.tracking.spool import SPOOL_FILE
from genattr.twins.materialize import build_kwargs, mark, materialize, model_overrides
from genattr.utils.errors import ConfigError
from genattr.utils.git import git_info
from genattr.utils.instantiate import build
from genattr.utils.io import atomic_write_json, atomic_write_text
from genattr.utils.seed import seed_everything

log = logging.getLogger(__name__)

#: Keys that do not change results; a checkpoint may be resumed across changes to them.
_NOT_RESULT_SHAPING = ("resume", "stop_after_task", "paths", "tracking", "tags", "cluster", "task_name", "strict_git")


def _hydra_overrides() -> list[str]:
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        return []
    return list(HydraConfig.get().overrides.task)


def _compose(overrides: list[str]) -> DictConfig:
    """The config for ``overrides``, composed by the running Hydra app or, outside one (tests), by a fresh one."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="config", overrides=overrides)
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


def config_fingerprint(cfg: DictConfig) -> str:
    data = OmegaConf.to_container(cfg, resolve=True)
    for key in _NOT_RESULT_SHAPING:
        data.pop(key, None)
    data.get("trainer", {}).pop("num_workers", None)
    # a method may name its own keys that never change results (dotted, below ``method``)
    method = data.get("method") or {}
    for dotted in method.pop("not_result_shaping", None) or []:
        *parents, leaf = str(dotted).split(".")
        node = method
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(leaf, None)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _checkpointer(cfg: DictConfig, out: Path) -> Checkpointer:
    ckpt = Checkpointer(out / "checkpoints", keep_last=int(cfg.trainer.keep_checkpoints))
    resume = str(cfg.resume)
    if resume == "never":
        if ckpt.completed():
            raise ConfigError(
                f"{ckpt.folder} already holds checkpoints and resume=never; use resume=auto to continue "
                "that run or another hydra.run.dir for a fresh one."
            )
    elif resume != "auto":
        src = Checkpointer(Path(resume).expanduser() / "checkpoints")
        found = src.latest()
        if found is None:
            raise ConfigError(f"resume={resume}: no task checkpoint under {src.folder}.")
        if not ckpt.completed():
            shutil.copytree(found[0], ckpt.path(int(found[1]["task"])))
            log.warning("resume: copied %s into %s", found[0], ckpt.folder)
    return ckpt


def build_protocol(cfg: DictConfig, *, main_process: bool = True, wait: Callable[[], None] | None = None) -> Any:
    """The data option's protocol; with ``data.root: null`` its twin is written (or found in the cache) first and
    read by the same real loader. A twin may also decide model keys (a twin-pretrained backbone), set here."""
    twin = materialize(cfg, main_process=main_process, wait=wait)
    model_overrides(cfg, twin)
    return mark(build(cfg.data, **build_kwargs(twin)), twin)


def _tracker(cfg: DictConfig, main_process: bool) -> Tracker:
    if not main_process:
        return NullTracker()
    return build(cfg.tracking)


def run(cfg: DictConfig, overrides: Sequence[str] | None = None) -> Report:
    """Run the experiment described by ``cfg``; return the method's report."""
    register_resolvers()
    overrides = _hydra_overrides() if overrides is None else list(overrides)
    reject_unknown_additions(overrides, _compose)
    profile_changes = apply_cpu_profile(cfg, explicit_override_keys(overrides))
    check_compatibility(cfg)
    out = Path(cfg.paths.output_dir)
    seed_everything(int(cfg.seed), deterministic=bool(cfg.trainer.deterministic))
    accelerator = make_accelerator(cfg.trainer)
    main = accelerator.is_main_process
    checkpoints = _checkpointer(cfg, out) if main else Checkpointer(out / "checkpoints")
    accelerator.wait_for_everyone()
    found = checkpoints.latest()
    tracker = _tracker(cfg, main)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    source = "twin" if cfg.data.get("root") is None else "real"
    tags = {
        "method": str(cfg.method.name),
        "data": str(cfg.data.name),
        "data_source": source,
        "profile": profile_in_use(cfg),
        "seed": str(cfg.seed),
        "task_name": str(cfg.task_name),
        "output_dir": str(out),
        "overrides": " ".join(overrides)[:5000],
        **git_info(cfg.paths.root_dir),
    } | {f"tag.{t}": "true" for t in cfg.get("tags") or []}
    fingerprint = config_fingerprint(cfg)
    run_id = found[1].get("mlflow_run_id") if found else _run_before_any_checkpoint(cfg, out, tracker, fingerprint)
    if main:
        tracker.attach_spool(out / SPOOL_FILE)  # an MLflow outage spools here instead of failing the run
    parent = _parent_run(tracker)
    tags |= _cluster_tags(accelerator.num_processes)
    tracker.start(
        run_name=f"{cfg.task_name}-s{cfg.seed}",
        tags=tags,
        params=flatten_params(resolved),
        run_id=run_id,
        parent_run_id=parent,
    )
    try:
        if main:
            out.mkdir(parents=True, exist_ok=True)
            _write_run_info(
                out, tracker, tags, overrides, parent, resumed_from=found[0] if found else None, fingerprint=fingerprint
            )
            atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
            tracker.log_artifact(out / "config.yaml", "config")
            if profile_changes:
                tracker.log_dict({"applied": profile_changes}, "config/cpu_profile.json")
        ctx = RunContext(
            accelerator=accelerator,
            tracker=tracker,
            output_dir=out,
            checkpoints=checkpoints,
            seed=int(cfg.seed),
            stop_after_task=cfg.get("stop_after_task"),
            config_fingerprint=fingerprint,
        )
        protocol = build_protocol(cfg, main_process=main, wait=accelerator.wait_for_everyone)
        if main:
            tracker.log_dict(_jsonable(protocol.info), "data/info.json")
        method = build(
            cfg.method,
            model=OmegaConf.to_container(cfg.model, resolve=True),
            trainer=OmegaConf.to_container(cfg.trainer, resolve=True),
        )
        report = method.run(protocol, ctx)
        if accelerator.device.type == "cuda":  # what the card needed (make gpu-check reads it)
            report.results["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated(accelerator.device) / 2**30, 2)
        if main:
            _record_bad_images(report, protocol)
            _write_outputs(report, out, tracker)
    except (SystemExit, KeyboardInterrupt):
        # preempted / timed out (submitit requeues the job) or stopped by hand: the run continues later
        tracker.end("KILLED")
        raise
    except BaseException:
        tracker.end("FAILED")
        raise
    tracker.end("FINISHED" if report.completed else "KILLED")
    if main:
        _record_run_id(out, tracker)
        print(report.summary)
        print(f"results: {out / 'results.json'}")
        print(tracker.describe())
    return report


def _parent_run(tracker: Tracker) -> str | None:
    """The sweep's parent MLflow run, when this job belongs to a multirun tracked on the same server."""
    parent = sweep.read_parent(sweep.current_sweep_dir())
    if not parent or not parent.get("parent_run_id"):
        return None
    if parent.get("tracking_uri") != getattr(tracker, "tracking_uri", None):
        log.warning("the sweep's parent run lives at %s, not at this job's tracking URI", parent.get("tracking_uri"))
        return None
    return str(parent["parent_run_id"])


def _cluster_tags(world_size: int) -> dict[str, str]:
    """Where and how the job ran: SLURM job id, requeue count, number of processes."""
    tags = {"world_size": str(world_size)}
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_RESTART_COUNT", "slurm_restart_count")):
        if os.environ.get(env):
            tags[tag] = os.environ[env]
    return tags


def _run_before_any_checkpoint(cfg: DictConfig, out: Path, tracker: Tracker, fingerprint: str) -> str | None:
    """With ``resume=auto``, the MLflow run of an attempt in this folder that died before its first checkpoint
    (same settings, same tracking store): the rerun continues it instead of leaving it RUNNING beside a new one."""
    info = sweep.read_json(out / sweep.RUN_INFO_FILE) or {}
    same_store = (info.get("tracking_uri"), info.get("experiment")) == (
        getattr(tracker, "tracking_uri", None),
        getattr(tracker, "experiment", None),
    )
    if str(cfg.resume) != "auto" or info.get("config_fingerprint") != fingerprint or not same_store:
        return None
    return info.get("mlflow_run_id")


def _write_run_info(
    out: Path,
    tracker: Tracker,
    tags: dict[str, str],
    overrides: list[str],
    parent: str | None,
    resumed_from: Any,
    fingerprint: str,
) -> None:
    """``run_info.json``: the run's MLflow id and provenance, read by the sweep callback and ``make rerun``."""
    info = {
        "mlflow_run_id": tracker.run_id,
        "tracking_uri": getattr(tracker, "tracking_uri", None),
        "experiment": getattr(tracker, "experiment", None),
        "parent_run_id": parent,
        "overrides": overrides,
        "resumed_from": str(resumed_from) if resumed_from else None,
        "config_fingerprint": fingerprint,
        "started_at": time.time(),
        **{k: v for k, v in tags.items() if k in ("git_sha", "git_dirty", "world_size", "slurm_job_id")},
        "slurm_restart_count": int(tags.get("slurm_restart_count", 0)),
    }
    atomic_write_json(out / sweep.RUN_INFO_FILE, info)


def _record_run_id(out: Path, tracker: Tracker) -> None:
    """A run created only after an outage gets its MLflow id into ``run_info.json`` at the end."""
    path = out / sweep.RUN_INFO_FILE
    info = json.loads(path.read_text()) if path.is_file() else {}
    if tracker.run_id is not None and info.get("mlflow_run_id") != tracker.run_id:
        atomic_write_json(path, {**info, "mlflow_run_id": tracker.run_id})


def _record_bad_images(report: Report, protocol: Any) -> None:
    """Images left out under ``data.on_bad_image=skip`` (at the scan and at decode time) go into the results."""
    stats = getattr(protocol, "bad_images", None)
    if stats is not None:
        report.results["bad_images"] = stats.as_dict()
        report.metrics["data/bad_images_skipped"] = float(stats.total)


def _write_outputs(report: Report, out: Path, tracker: Tracker) -> None:
    atomic_write_json(out / "results.json", report.results)
    tracker.log_artifact(out / "results.json")
    if report.metrics:
        tracker.log_metrics(report.metrics)
    for path in report.artifacts:
        # artifacts keep the folder they were written to below the output dir (plots/, predictions/, ...)
        rel = path.parent.relative_to(out) if path.is_relative_to(out) else Path("artifacts")
        tracker.log_artifact(path, None if str(rel) == "." else rel.as_posix())


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
