"""``medseg train --config CFG.yaml``: train a zoo network, resumable, DDP under torchrun."""

from __future__ import annotations

import math

import click

from ..console import Console, command_options, escape
from ..errors import InputError, ModelError


def _parse_set(items: tuple[str, ...]) -> dict:
    import yaml

    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise InputError(f"--set {item!r}: expected KEY=VALUE (e.g. training.epochs=5)")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


def _fmt(value) -> str:
    if value == "" or value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


@click.command(name="train")
@click.option("--config", "config_path", type=click.Path(path_type=str), default=None,
              help="YAML training config (see --print-config and configs/).")
@click.option("--print-config", "print_model", default=None, metavar="MODEL",
              help="Print a complete commented example config for zoo network MODEL and exit.")
@click.option("--resume", is_flag=True, help="Continue from OUTPUT/last.pt (previous.pt if last.pt is corrupt).")
@click.option("--max-minutes", type=float, default=None,
              help="Stop cleanly (with a checkpoint) after the first epoch that ends past this many minutes.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Override a config key, e.g. --set training.epochs=5 (repeatable).")
@click.option("--no-export", is_flag=True, help="Skip the ONNX export at the end.")
@command_options
def train(config_path: str | None, print_model: str | None, resume: bool, max_minutes: float | None,
          device: str, overrides: tuple[str, ...], no_export: bool, console: Console) -> None:
    """Train a network as the config says: patches with foreground oversampling, augmentation,
    checkpoints every epoch (last.pt / previous.pt / best.pt), validation with the sliding window that
    `medseg predict` uses, and an ONNX model with its card at the end. Under `torchrun
    --nproc_per_node N -m medseg_cli train ...` it trains with DDP."""
    from ..training.config import example_config, load_config

    if print_model:
        try:
            text = example_config(print_model)
        except ModelError as err:  # a typo on the command line is bad input
            raise InputError(f"--print-config: {err.problem}", hint=err.hint) from None
        click.echo(text, nl=False)
        return
    if not config_path:
        raise InputError("no config given", hint="Use --config CFG.yaml, or --print-config MODEL for an example.")
    config = load_config(config_path, _parse_set(overrides))

    from rich.table import Table

    from ..training.loop import train as run_training

    def epoch_printer(stage_config):
        labels = [str(stage_config.labels[k]) for k in sorted(stage_config.labels, key=int)][1:]
        first = [True]  # the header goes above the first row printed (epoch 1, or the first resumed epoch)

        def on_epoch(row: dict) -> None:
            if console.quiet or console.json_mode:
                return
            table = Table(show_header=first[0], box=None, pad_edge=False)
            first[0] = False
            for name in ["epoch", "loss", "lr", "val Dice"] + labels + ["s"]:
                table.add_column(name, justify="right", min_width=10)
            table.add_row(str(row["epoch"]), _fmt(row["loss"]), _fmt(row["lr"]), _fmt(row.get("val_dice_mean")),
                          *[_fmt(row.get(f"val_dice_{name}", "")) for name in labels], _fmt(row["seconds"]))
            console.print(table)

        return on_epoch

    if config.cascade is not None:
        _train_cascade(config, console, resume=resume, max_minutes=max_minutes, device=device,
                       on_epoch=lambda stage, stage_config: epoch_printer(stage_config), export=not no_export)
        return
    on_epoch = epoch_printer(config)
    result = run_training(config, resume=resume, max_minutes=max_minutes, device=device,
                          progress=console.progress(), on_epoch=on_epoch, export=not no_export,
                          log=console.info)
    if not result.summary:  # not rank 0
        return

    def render() -> None:
        where = result.onnx_path or result.output
        dice = ", ".join(f"{k} {v:.4f}" for k, v in result.val_dice.items() if isinstance(v, float))
        console.info(f"trained {result.epochs_done} epochs in {result.seconds / 60:.1f} min"
                     + (f"; validation Dice {dice}" if dice else ""))
        if result.onnx_path:
            console.info(f"model: {escape(str(where))}  (run it: medseg predict --model {escape(str(where))} SCAN)")
        else:
            console.info(f"checkpoints in {escape(str(result.output))}")

    console.emit(result.summary, render=render)


def _train_cascade(config, console: Console, **options) -> None:
    """Both stages of a cascade config, then its card (see medseg_cli.training.cascade)."""
    from ..training.cascade import train_cascade

    result = train_cascade(config, progress=console.progress(), log=console.info, **options)

    def render() -> None:
        seg = result.summary["stages"].get("segmenter") or {}
        dice = ", ".join(f"{k} {v:.4f}" for k, v in (seg.get("validation_dice") or {}).items()
                         if isinstance(v, float))
        console.info(f"cascade trained in {result.seconds / 60:.1f} min"
                     + (f"; segmenter validation Dice {dice}" if dice else ""))
        if result.card_path:
            where = escape(str(result.card_path))
            console.info(f"cascade card: {where}  (run it: medseg predict --model {where} SCAN)")
        else:
            console.info(f"checkpoints in {escape(str(result.output))}"
                         + ("; continue with --resume" if result.stopped_early else ""))

    console.emit(result.summary, render=render)
