import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from cnnpipe import PipelineError
from cnnpipe.base.config import compose_params
from tests.helpers import CONF, ROOT, shipped_conf


def committed(name: str) -> str:
    """`name` as the last commit has it: the working tree's may be regenerated from this
    machine's conf/local/ (docs/pipeline.md, Offline)."""
    return subprocess.run(
        ["git", "show", f"HEAD:{name}"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout


def test_params_yaml_is_the_composed_default():
    assert committed("params.yaml") == compose_params(conf_dir=CONF), (
        "params.yaml drifted from conf/: run `make params` and commit it"
    )


def test_local_settings_go_over_everything_but_the_command_line(tmp_path):
    conf = shipped_conf(tmp_path)
    (conf / "local").mkdir()
    (conf / "local" / "default.yaml").write_text("seed: 7\nloader:\n  batch_size: 64\n")
    cfg = OmegaConf.create(compose_params(["seed=3"], conf_dir=conf))
    assert (cfg.seed, cfg.loader.batch_size) == (3, 64)


def test_a_local_archive_is_cifar10s_alone(tmp_path):
    """docs/pipeline.md's offline setting applies to data=cifar10, and a folder run never
    inherits its source or md5."""
    conf = shipped_conf(tmp_path)
    (conf / "local" / "data").mkdir(parents=True)
    md5 = "5912d72513c2fa989e976f23c36e7bc6"
    local = f"source: /archives/cifar-10-python.tar.gz\nmd5: {md5}\n"
    (conf / "local" / "data" / "cifar10.yaml").write_text(local)
    cifar = OmegaConf.create(compose_params([], conf_dir=conf)).data
    assert (cifar.source, cifar.md5) == ("/archives/cifar-10-python.tar.gz", md5)
    assert cifar.timeout_s == 60, "the rest of the node stays"
    folder = OmegaConf.create(compose_params(["data=folder"], conf_dir=conf)).data
    shipped = OmegaConf.create(compose_params(["data=folder"], conf_dir=CONF)).data
    assert folder == shipped
    assert folder.md5 is None and folder.source != cifar.source
    with_source = ["data=folder", "data.source=/tmp/digits.zip"]
    assert OmegaConf.create(compose_params(with_source, conf_dir=conf)).data.source == (
        "/tmp/digits.zip"
    )


def test_an_archive_set_for_every_data_choice_is_refused_in_one_line(tmp_path):
    conf = shipped_conf(tmp_path)
    (conf / "local").mkdir()
    local = "data:\n  source: /a/cifar-10-python.tar.gz\n  md5: 5912d72513c2fa989e976f23c36e7bc6\n"
    (conf / "local" / "default.yaml").write_text(local)
    with pytest.raises(PipelineError) as error:
        compose_params(["data=folder"], conf_dir=conf)
    assert str(error.value) == (
        f"{conf}/local/default.yaml sets data.source or data.md5 for every data choice; move "
        "them, without `data:`, to conf/local/data/cifar10.yaml (or the choice they belong to) "
        "(docs/pipeline.md, Offline)"
    )


def test_a_data_choice_in_local_settings_outlives_other_overrides(tmp_path):
    """docs/own-images.md: the folder chosen once in conf/local stays chosen when `dvc exp run -S`
    (Hydra overrides) changes something else, and the command line can still choose again."""
    conf = shipped_conf(tmp_path)
    (conf / "local").mkdir()
    local = "defaults:\n  - override /data: folder\ndata:\n  source: /home/me/leaves\n"
    (conf / "local" / "default.yaml").write_text(local)
    cfg = OmegaConf.create(compose_params(["optim.lr=0.01"], conf_dir=conf))
    assert (cfg.data.layout, cfg.data.source, cfg.optim.lr) == (
        "image_folder",
        "/home/me/leaves",
        0.01,
    )
    assert cfg.data.dependency == "/home/me/leaves", "DVC watches the folder itself"
    assert OmegaConf.create(compose_params(["data=cifar10"], conf_dir=conf)).data.layout == (
        "cifar10_batches"
    )


def test_gitignore_keeps_local_settings_out_of_git():
    ignored = subprocess.run(
        ["git", "check-ignore", "conf/local/default.yaml"], cwd=ROOT, capture_output=True
    )
    assert ignored.returncode == 0


def test_overrides_compose_into_params():
    cfg = OmegaConf.create(compose_params(["trainer.max_epochs=3", "optim.lr=0.01"], conf_dir=CONF))
    assert cfg.trainer.max_epochs == 3
    assert cfg.optim.lr == 0.01
    assert cfg.model._target_ == "cnnpipe.training.models.ChapterCNN"


def test_default_points_at_the_official_archive():
    cfg = OmegaConf.create(committed("params.yaml"))
    assert cfg.data.source == "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    assert cfg.data.md5 == "c58f30108f718f92721af3b95e74349a"


def test_dvc_composes_params_through_hydra():
    dvc_config = (ROOT / ".dvc" / "config").read_text()
    assert "[hydra]" in dvc_config and "enabled = true" in dvc_config


def test_an_unknown_choice_of_every_group_names_the_group_and_its_options():
    for group in sorted(p.name for p in CONF.iterdir() if p.is_dir()):
        if group in ("hydra", "local"):
            continue
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        with pytest.raises(PipelineError) as error:
            compose_params([f"{group}=does_not_exist"], conf_dir=CONF)
        assert str(error.value) == (
            f"conf/{group} has no does_not_exist; choose one of: {', '.join(options)}"
        )


def test_an_unknown_choice_is_left_to_hydra_outside_cnnpipe_and_for_optional_groups(tmp_path):
    from hydra import compose, initialize_config_dir
    from hydra.errors import MissingConfigException

    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "small.yaml").write_text("width: 1\n")
    (tmp_path / "config.yaml").write_text("defaults:\n  - model: small\n")
    refused = pytest.raises(MissingConfigException, match="Could not find 'model/big'")
    with initialize_config_dir(str(tmp_path), version_base=None), refused:
        compose(config_name="config", overrides=["model=big"])
    # cnnpipe's optional conf/local/default.yaml stays optional: params.yaml has no mark.
    assert "unknown_choice" not in compose_params(conf_dir=CONF)


@pytest.mark.slow
def test_the_tests_pass_with_this_machines_offline_setting_in_place(tmp_path):
    """The tests are hermetic: a copy of the repository with conf/local/ and a params.yaml
    regenerated from it passes the tests that once read them."""
    from tests.helpers import copy_repo, repo_env

    copy_repo(tmp_path)
    env = repo_env(tmp_path)
    for command in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        subprocess.run(["git", *command], cwd=tmp_path, env=env, check=True)
    (tmp_path / "conf" / "local" / "data").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "default.yaml").write_text("seed: 7\n")
    (tmp_path / "conf" / "local" / "data" / "cifar10.yaml").write_text(
        "source: /archives/cifar-10-python.tar.gz\nmd5: 5912d72513c2fa989e976f23c36e7bc6\n"
    )
    subprocess.run(["cnnpipe", "params"], cwd=tmp_path, env=env, check=True)
    assert "/archives/cifar-10-python.tar.gz" in (tmp_path / "params.yaml").read_text()
    tests = [
        "tests/test_config.py",
        "tests/test_prepare_folder.py::test_an_archive_member_pointing_outside_is_refused",
    ]
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-m", "not slow", "-p", "no:cacheprovider", *tests],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
