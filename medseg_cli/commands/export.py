"""``medseg export CHECKPOINT -o model.onnx``: torch checkpoint -> ONNX with its card, parity-checked."""

from __future__ import annotations

import click

from ..atomic import check_output_path
from ..console import Console, command_options, escape

#: newest opset torch's TorchScript exporter (dynamo=False, the one medseg uses) writes; torch itself
#: dumps its whole IR graph on stderr for a higher one
MAX_OPSET = 20


@click.command(name="export")
@click.argument("checkpoint", type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=str), help="The .onnx file to write.")
@click.option("--opset", type=click.IntRange(min=17, max=MAX_OPSET), default=17, show_default=True,
              help=f"ONNX opset (17-{MAX_OPSET}).")
@click.option("--static", is_flag=True, help="Fix the spatial axes to the card's input patch (batch stays dynamic).")
@click.option("--atol", type=float, default=1e-4, show_default=True,
              help="Largest max-abs difference between ONNX Runtime and torch (in units of max(1, |output|)) that passes.")
@command_options
def export(checkpoint: str, output: str, opset: int, static: bool, atol: float, console: Console) -> None:
    """Export a medseg torch CHECKPOINT (.pt) to ONNX with its model card, then check that ONNX Runtime
    and torch give the same output on a random input."""
    check_output_path(output)  # before the slow export: a bad -o fails at once, nothing written
    from exporters.onnx_export import export_checkpoint

    path = export_checkpoint(checkpoint, output, opset=opset, dynamic=not static, atol=atol)
    size = path.stat().st_size
    console.emit({"onnx": str(path), "bytes": size, "opset": opset},
                 render=lambda: console.info(f"wrote {escape(str(path))} ({size / 1e6:.1f} MB), parity checked"))
