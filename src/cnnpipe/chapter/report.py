"""The chapter's report: the numbers and pictures next to the claims, as Markdown from
report.md.j2, and as one self-contained HTML page."""

import base64
import json
import os
import re
from importlib.resources import files
from pathlib import Path

import jinja2
from markdown_it import MarkdownIt
from omegaconf import DictConfig

from cnnpipe.base.config import network_name

TEMPLATE = jinja2.Template(
    files("cnnpipe.chapter").joinpath("report.md.j2").read_text(),
    undefined=jinja2.StrictUndefined,
    keep_trailing_newline=True,
)


def report(cfg: DictConfig, numbers: dict) -> str:
    """The Markdown report of `numbers` and the metrics and pictures in `cfg.paths`."""
    here = Path(cfg.paths.chapter_report).parent
    params = json.loads(Path(cfg.paths.params_json).read_text())
    dense_layers = [
        {
            "image": f"{h}x{w}x{ch}",
            "units": units,
            "params": params[f"model.dense_layer_{h}x{w}x{ch}_to_{units}_params"],
            "times": params[f"model.dense_layer_{h}x{w}x{ch}_to_{units}_times_model"],
        }
        for h, w, ch, units in cfg.report.dense_baselines
    ]
    return TEMPLATE.render(
        params=params,
        dense_layers=dense_layers,
        cnn_train=json.loads(Path(cfg.paths.train_metrics).read_text()),
        cnn_test=json.loads(Path(cfg.paths.eval_metrics).read_text()),
        dense=json.loads(Path(cfg.paths.baseline_metrics).read_text()),
        cnn_name=network_name(cfg.model),
        dense_name=network_name(cfg.baseline.model),
        shifts=list(cfg.chapter.shifts),
        numbers=numbers,
        link={
            key: Path(os.path.relpath(cfg.paths[key], here)).as_posix()
            for key in ("params_png", "filters_png", "feature_maps_png", "curves_png")
            + ("confusion_png", "mistakes_png")
        },
    )


def self_contained_html(markdown: str, here: Path) -> str:
    """The report as one HTML page with its pictures inside, for viewers that cannot follow a
    relative link (MLflow's artifact view renders HTML, not Markdown images)."""

    def inline(match: re.Match) -> str:
        png = base64.b64encode(Path(os.path.normpath(here / match[1])).read_bytes()).decode()
        return f'src="data:image/png;base64,{png}"'

    body = MarkdownIt("commonmark").enable("table").render(markdown)
    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = "body{font-family:sans-serif;max-width:60em}img{max-width:100%}td,th{padding:0 .6em}"
    return f"<!doctype html><meta charset=utf-8><style>{style}</style>{body}"
