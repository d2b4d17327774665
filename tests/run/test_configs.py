"""Every config option composes; launcher profiles carry the right resources; bad options
and nonsense combinations fail with one sentence listing what exists."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import MissingConfigException
from omegaconf import OmegaConf

from genattr.config import apply_cpu_profile, check_compatibility, explicit_override_keys, profile_in_use
from genattr.utils.errors import ConfigError

CONF = Path(__file__).resolve().parents[2] / "conf"
GROUPS = ["data", "method", "model", "trainer", "tracking", "paths", "debug", "experiment", "local"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml") if not p.stem.startswith("_"))


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in GROUPS for o in _options(g)] + ["debug=default", "experiment=lorax_cddb_long"]
)
def test_every_option_composes_and_resolves(compose_cfg, override):
    cfg = compose_cfg([override])
    OmegaConf.resolve(cfg)  # no dangling interpolation
    assert cfg.method.name and cfg.data.name


@pytest.mark.parametrize("experiment", [e for e in _options("experiment") if e.startswith("lorax_")])
def test_experiment_is_the_paper_recipe(compose_cfg, experiment):
    cfg = compose_cfg([f"experiment={experiment}"])
    assert cfg.model.name == "convit_base" and cfg.model.pretrained
    assert cfg.trainer.epochs == 50 and cfg.trainer.batch_size == 32
    assert cfg.trainer.mixed_precision == "fp16" and cfg.method.memory.size == 500
    assert cfg.method.lora.r == 64 and cfg.method.lora.lora_alpha == 16 and cfg.method.targets == "gpsa_qk_v"
    assert cfg.data.name == experiment.removeprefix("lorax_")


def test_scenario_task_lists(compose_cfg):
    easy = compose_cfg(["data=cddb_easy"]).data.tasks
    hard = compose_cfg(["data=cddb_hard"]).data.tasks
    long = compose_cfg(["data=cddb_long"]).data.tasks
    assert list(easy) == ["gaugan", "biggan", "cyclegan", "imle", "deepfake", "crn", "wild"]
    assert list(hard) == ["gaugan", "biggan", "wild", "whichfaceisreal", "san"]
    assert len(long) == 12 and list(long[-2:]) == ["whichfaceisreal", "san"]


@pytest.mark.parametrize("launcher", ["local", "slurm"])
def test_launcher_profiles_compose(launcher):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[f"hydra/launcher={launcher}", "cluster.partition=gpu", "cluster.account=lab"],
            return_hydra_config=True,
        )
    lc = cfg.hydra.launcher
    assert lc.submitit_folder.endswith("/.submitit/%j")
    if launcher == "slurm":
        assert "SlurmLauncher" in lc._target_
        assert lc.gpus_per_node == 1 and lc.tasks_per_node == lc.gpus_per_node  # one task per GPU
        assert lc.partition == "gpu" and lc.account == "lab" and lc.signal_delay_s >= 60
    else:
        assert "LocalLauncher" in lc._target_ and lc.gpus_per_node == 0
    assert cfg.hydra.job.chdir is False


def test_unknown_option_lists_what_exists(compose_cfg):
    with pytest.raises(MissingConfigException) as err:
        compose_cfg(["method=dytox"])
    msg = str(err.value)
    assert "method/dytox" in msg and "lorax" in msg and "replay" in msg


def test_wrong_protocol_is_one_sentence(compose_cfg):
    cfg = compose_cfg([])
    cfg.data.protocol = "detection"
    with pytest.raises(ConfigError, match=r"method=lorax supports the protocols \['continual'\].*'detection'"):
        check_compatibility(cfg)


def test_cpu_profile_applies_on_the_twin_but_command_line_wins(compose_cfg):
    cfg = compose_cfg(["trainer.epochs=7", "model.img_size=48"])
    changes = apply_cpu_profile(cfg, explicit_override_keys(["trainer.epochs=7", "model.img_size=48"]))
    assert cfg.trainer.epochs == 7 and cfg.model.img_size == 48  # user overrides kept
    assert cfg.model.name == "convit_tiny" and cfg.data.crop == 32  # profile applied elsewhere
    assert any(c.startswith("model.name") for c in changes)


def test_profile_auto_is_paper_on_real_data_and_one_switch_gives_cpu_size(compose_cfg, tmp_path):
    """A user pointing data.root at real CDDB on a laptop: profile=cpu is the one switch for CPU-size settings."""
    cfg = compose_cfg([f"data.root={tmp_path}"])
    assert profile_in_use(cfg) == "paper" and apply_cpu_profile(cfg, set()) == []
    assert cfg.model.name == "convit_base" and cfg.trainer.epochs == 50
    cfg = compose_cfg([f"data.root={tmp_path}", "profile=cpu"])
    assert apply_cpu_profile(cfg, set()) and cfg.model.name == "convit_tiny" and cfg.data.root == str(tmp_path)
    cfg = compose_cfg(["profile=paper"])  # the twin at the paper's settings
    assert profile_in_use(cfg) == "paper" and apply_cpu_profile(cfg, set()) == []
    with pytest.raises(ConfigError, match="profile=fast is not a profile"):
        apply_cpu_profile(compose_cfg(["profile=fast"]), set())


def test_a_profile_that_only_fits_its_twin_refuses_real_data(compose_cfg, tmp_path):
    cfg = compose_cfg(["method=unlearn", "data=mscoco", f"data.root={tmp_path}", "profile=cpu"])
    with pytest.raises(ConfigError, match="profile=cpu with data=mscoco on real data"):
        apply_cpu_profile(cfg, set())


def test_a_plus_override_of_an_unknown_key_is_refused_with_a_suggestion(tmp_path):
    """``+method.memory.sise=10`` used to run LoRAX with the default memory; every option has a YAML default."""
    from genattr.config import reject_unknown_additions
    from genattr.run import _compose

    with pytest.raises(ConfigError, match=r"method.memory has no key 'sise' \(did you mean method.memory.size\?\)"):
        reject_unknown_additions(["method=lorax", "+method.memory.sise=10"], _compose)
    with pytest.raises(ConfigError, match=r"\+trainer.epochz=3: trainer has no key 'epochz'"):
        reject_unknown_additions(["+trainer.epochz=3"], _compose)
    with pytest.raises(ConfigError, match="there is no method.nothere"):
        reject_unknown_additions(["++method.nothere.x=1"], _compose)
    # an existing key, a free-form mapping (empty in the YAML) and a config group are fine
    reject_unknown_additions(["+method.memory.size=10", "++trainer.epochs=2"], _compose)
    reject_unknown_additions(["method=unlearn", "data=mscoco", "+data.files.null_text_embedding=n.npy"], _compose)
    reject_unknown_additions(["+experiment=lorax_cddb_hard"], _compose)
