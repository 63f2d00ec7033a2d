import shutil

import pytest

from cnnpipe.base.config import compose_params
from cnnpipe.cli import COMMANDS, main
from tests.helpers import CONF, cnnpipe


def test_user_errors_are_one_line_without_traceback(tmp_path):
    params = compose_params(["data.source=/nonexistent/cifar-10-python.tar.gz"], conf_dir=CONF)
    (tmp_path / "params.yaml").write_text(params)
    result = cnnpipe("prepare", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().startswith(
        "cnnpipe prepare: error: cannot read file:///nonexistent"
    )
    assert len(result.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "data").iterdir()) == []


def test_missing_checkpoint_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(compose_params(conf_dir=CONF))
    result = cnnpipe("export", cwd=tmp_path)
    assert result.returncode == 1
    # The stage opens the training's MLflow run first: that is what is missing before training.
    assert result.stderr == (
        "cnnpipe export: error: no MLflow run recorded in models/mlflow_run.json; "
        "run `dvc repro train`\n"
    )


def test_unknown_command_prints_usage(tmp_path):
    result = cnnpipe("frobnicate", cwd=tmp_path)
    assert result.returncode == 1 and "usage: cnnpipe" in result.stderr


def test_config_errors_are_one_line(tmp_path):
    shutil.copytree(CONF, tmp_path / "conf")
    cases = [
        (("params", "trainer.foo=1"), None, "cnnpipe params: error: conf/ has no setting "
         "trainer.foo; see params.yaml for the settings there are"),
        (("params", "trainer=tpu"), None,
         "cnnpipe params: error: conf/trainer has no tpu; choose one of: cpu, ddp, gpu"),
        (("prepare",), "data:\n  url: [oops\n", "cnnpipe prepare: error: params.yaml is not valid "
         "YAML (expected ',' or ']', but got '<stream end>' at line 3, column 1); fix it, or "
         "remake it with `cnnpipe params`"),
        (("evaluate",), "data:\n\turl: x\n", "cnnpipe evaluate: error: params.yaml is not valid "
         "YAML (found character '\\t' that cannot start any token at line 2, column 1); fix it, "
         "or remake it with `cnnpipe params`"),
        (("train",), "", "cnnpipe train: error: no params.yaml here; run the stages in the "
         "repository root, or make it with `cnnpipe params`"),
        # Under Hydra's own command line, composed by Hydra: the same lines, and only them.
        (("train", "model=does_not_exist"), None, "cnnpipe train: error: conf/model has no "
         "does_not_exist; choose one of: chapter_cnn, chapter_cnn_bn, dense_baseline, resnet9"),
        (("train", "model@baseline.model=wide"), None, "cnnpipe train: error: conf/model has "
         "no wide; choose one of: chapter_cnn, chapter_cnn_bn, dense_baseline, resnet9"),
        (("train", "trainer.max_epochs=abc"), None,
         "cnnpipe train: error: config key trainer.max_epochs: 'abc' is not an integer"),
    ]  # fmt: skip
    for args, params, message in cases:
        (tmp_path / "params.yaml").unlink(missing_ok=True)
        if params:
            (tmp_path / "params.yaml").write_text(params)
        result = cnnpipe(*args, cwd=tmp_path)
        assert (result.returncode, result.stderr) == (1, message + "\n"), args


def test_training_without_data_names_the_stage_to_run(tmp_path):
    (tmp_path / "params.yaml").write_text(compose_params(conf_dir=CONF))
    result = cnnpipe("train", cwd=tmp_path)
    assert result.stderr.splitlines()[-1] == (
        "cnnpipe train: error: no prepared data in data/prepared; run `dvc repro prepare`"
    )
    assert "Traceback" not in result.stderr and result.returncode == 1


# Each command's own options with values of every wrong kind: text, zero, negative, NaN and
# infinite numbers, out of range. `cnnpipe train key=value` is Hydra's parser, not ours.
BAD_OPTIONS = {
    "predict": {"--top-k": ["abc", "0", "-1", "1.5"], "--batch-size": ["0", "-8", "nan", "x"]},
    "serve": {
        "--port": ["-1", "65536", "http", "80.5"],
        "--max-body-mb": ["0", "-1", "nan", "inf", "ten"],
        "--top-k": ["0", "-3"],
        "--body-timeout-s": ["0", "-1", "nan", "inf"],
        "--header-timeout-s": ["0", "1e9", "nan"],
        "--alias-check-s": ["-1", "nan", "inf", "soon"],
        "--capture-unsure-below": ["-0.1", "1.5", "nan", "half"],
        "--capture-share": ["-1", "2", "nan"],
        "--capture-mb": ["0", "-1", "nan"],
        "--drift-window": ["-1", "1e9", "2000000", "nan", "all"],
    },
    "runs": {"--last": ["0", "-5", "all", "nan"]},
    "review": {"--port": ["-1", "65536", "http"]},
}
POSITIONAL = {
    "predict": ["model.onnx", "photo.png"], "serve": ["model.onnx"], "runs": [],
    "review": ["captured"], "monitor": ["captured"], "share": ["--to", "http://127.0.0.1:5000"],
}  # fmt: skip


def one_line_exit(argv: list[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    said = str(exit_.value.code)
    assert "\n" not in said and said.endswith("--help)"), said
    return said


@pytest.mark.parametrize("command", [c for c in COMMANDS if c != "train"])
def test_every_command_refuses_an_unknown_option_in_one_line(command):
    said = one_line_exit([command, *POSITIONAL.get(command, []), "--no-such-option"])
    assert said.startswith(f"cnnpipe {command}: error: unrecognized arguments: --no-such-option")


@pytest.mark.parametrize("command", list(BAD_OPTIONS))
def test_every_number_option_refuses_every_kind_of_wrong_value_in_one_line(command):
    for option, values in BAD_OPTIONS[command].items():
        for value in values:
            said = one_line_exit([command, *POSITIONAL[command], option, value])
            assert said.startswith(f"cnnpipe {command}: error: argument {option}: "), said
