"""Stage `train`: fit the configured network with Lightning and save the checkpoint."""

from pathlib import Path

from cnnpipe.base.args import Parser
from cnnpipe.base.config import load_params
from cnnpipe.data.prepared import require_prepared


def main(argv: list[str] | None = None) -> None:
    epilog = "cnnpipe train [--multirun] key=value ...: Hydra jobs outside DVC, into sweeps/"
    Parser(prog="cnnpipe train", description=__doc__, epilog=epilog).parse_args(argv)
    cfg = load_params()
    # A new user's most common first stumble, answered before seconds of imports.
    require_prepared(cfg.paths.data)
    from pytorch_lightning.utilities import rank_zero_only

    from cnnpipe.tracking.stage_run import stage_run, write_run_file
    from cnnpipe.training.fit import interrupted_run, log_training, train

    if rank_zero_only.rank != 0:
        # Another DDP process (started by Lightning, torchrun or SLURM): it trains, rank 0 logs.
        train(cfg)
        return
    resume = interrupted_run(cfg)
    # The run is RUNNING while training: a store that fails is found before the first epoch,
    # and finished epochs survive a failure later (the next run resumes from them).
    with stage_run(
        cfg, "train", new=True, run_id=resume and resume["run_id"], system_metrics=True
    ) as run:
        metrics = train(cfg, run.info.run_id)
        log_training(cfg, metrics)
    # Only a finished training becomes the run that the later stages log into.
    write_run_file(Path(cfg.paths.run), run.info.run_id)
    print(f"trained: val/acc {metrics['val/acc']:.4f} in {metrics['train.seconds']:.0f}s")
