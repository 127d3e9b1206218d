"""Where a training run's scalars go (``logger=tensorboard | csv | wandb | mlflow | none``), through
Lightning's own loggers, and what every one of them records the same way: the run folder and the
resolved config when the run starts (:func:`log_run`), the final evaluation's headline when it
ends (:func:`log_final_eval`, which also says where the files went)."""

import os
from pathlib import Path

from smooseg.errors import SmoosegError

LOGGER_TYPES = ("tensorboard", "csv", "wandb", "mlflow", "none")
DEFAULT_PROJECT = "smooseg"  # W&B project / MLflow experiment when logger.project is null


def build_logger(type, output_dir, project=None, entity=None, name=None, tags=(), tracking_uri=None):
    """The Lightning logger of ``type`` writing under ``output_dir`` (False for ``none``).

    tensorboard: ``<output_dir>/tensorboard``; csv: ``<output_dir>/csv/metrics.csv`` and
    ``hparams.yaml``; wandb: ``<output_dir>/wandb`` (``WANDB_MODE=offline`` keeps the run local);
    mlflow: ``tracking_uri``, else ``MLFLOW_TRACKING_URI``, else the file store
    ``<output_dir>/mlruns``. ``project`` is the W&B project or the MLflow experiment, ``entity``
    the W&B team, ``name`` the run's name (default: the run folder's name), ``tags`` a list of
    strings.
    """
    if type not in LOGGER_TYPES:
        raise SmoosegError(f"logger.type={type} is unknown; use logger=<{' | '.join(LOGGER_TYPES)}>")
    if type == "none":
        return False
    run_name = name or Path(output_dir).resolve().name
    tags = [str(tag) for tag in tags or ()]
    if type == "tensorboard":
        from pytorch_lightning.loggers import TensorBoardLogger

        return TensorBoardLogger(save_dir=output_dir, name="tensorboard", version="", default_hp_metric=False)
    if type == "csv":
        from pytorch_lightning.loggers import CSVLogger

        return CSVLogger(save_dir=output_dir, name="csv", version="")
    _require(type)
    if type == "wandb":
        from pytorch_lightning.loggers import WandbLogger

        Path(output_dir).mkdir(parents=True, exist_ok=True)  # wandb writes <save_dir>/wandb/
        return WandbLogger(project=project or DEFAULT_PROJECT, entity=entity, name=run_name, tags=tags,
                           save_dir=str(output_dir))
    from pytorch_lightning.loggers import MLFlowLogger

    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:  # a local file store: MLflow 3 keeps it only on request (its server wants a database)
        uri = (Path(output_dir).resolve() / "mlruns").as_uri()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MLFlowLogger(experiment_name=project or DEFAULT_PROJECT, run_name=run_name, tracking_uri=uri,
                        tags={tag: "true" for tag in tags} or None)


def _require(type):
    """Stop with one line when the optional package of logger ``type`` (wandb, mlflow: also the
    name of the pip extra that brings it) is not installed."""
    import importlib.util

    if importlib.util.find_spec(type) is None:
        raise SmoosegError(f"logger={type} needs the {type} package; pip install 'smooseg[{type}]' "
                           "or choose logger=tensorboard or logger=csv")


def flatten(tree, prefix=""):
    """``{"a/b": value}`` for the leaves of a nested dict (lists kept whole, as their text)."""
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{dotted}/"))
        else:
            flat[dotted] = str(value) if isinstance(value, (list, tuple)) else value
    return flat


def log_run(logger, output_dir, config):
    """Record the run folder and the resolved ``config`` (a plain nested dict) as the run's
    hyper-parameters, keys flattened to ``section/key``."""
    if not logger:
        return
    logger.log_hyperparams({"run/output_dir": str(Path(output_dir).resolve()), **flatten(config)})


def log_final_eval(logger, headline, step):
    """Record the final evaluation's ``headline`` (mIoU, Accuracy; ``crf`` tells which) as the
    metrics ``final_eval/mIoU`` and ``final_eval/Accuracy`` at ``step``, close the logger and
    print where its files are. ``headline`` None (no final evaluation) only closes it; a score
    that is null (no labelled pixel) is not logged."""
    if not logger:
        return
    scores = {f"final_eval/{key}": float(headline[key]) for key in ("mIoU", "Accuracy")
              if headline is not None and headline[key] is not None}
    if scores:
        logger.log_metrics(scores, step=step)
    logger.save()
    logger.finalize("success")
    print(f"logger: {where(logger)}", flush=True)
    finish = getattr(getattr(logger, "_experiment", None), "finish", None)
    if callable(finish):  # a W&B run: write its last records now, not at interpreter exit
        finish()


def where(logger):
    """Where ``logger``'s files are, in words (and how to upload an offline W&B run)."""
    name = type(logger).__name__
    if name == "WandbLogger":
        run_dir = Path(logger.experiment.dir).parent
        if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun") or logger.experiment.offline:
            return f"W&B offline run in {run_dir}; upload it with: wandb sync {run_dir}"
        return f"W&B run {logger.experiment.url} (local files in {run_dir})"
    if name == "MLFlowLogger":
        return f"MLflow run {logger.run_id} (experiment id {logger.experiment_id}) at {logger._tracking_uri}"
    if name == "CSVLogger":
        return f"CSV files in {logger.log_dir} (metrics.csv, hparams.yaml)"
    return f"TensorBoard files in {logger.log_dir} (tensorboard --logdir {logger.log_dir})"
