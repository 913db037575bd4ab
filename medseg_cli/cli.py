"""The ``medseg`` command: a thin click shell over the library.

Sub-commands live one per module in ``medseg_cli/commands/`` and are imported only when used, so
``medseg --help`` and ``medseg info`` start fast (torch and ONNX Runtime load only where needed).
"""

from __future__ import annotations

import importlib
import importlib.util

import click

from . import __version__

# command name -> (module in medseg_cli.commands, function name, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "info": ("info", "info", "Describe a scan or label map: size, spacing, orientation, labels."),
    "predict": ("predict", "predict", "Segment scans with a model; the mask keeps the input's geometry."),
    "eval": ("evaluate", "evaluate", "Compare predictions with reference labels (Dice, HD95, NSD, ...)."),
    "train": ("train", "train", "Train a zoo network from a YAML config (torchrun for multi-GPU)."),
    "export": ("export", "export", "Export a torch checkpoint to ONNX with its card, checking parity."),
    "fetch": ("fetch", "fetch", "Download (or register) model weights into the cache, verified."),
    "models": ("models", "models", "List known models and whether they are cached."),
    "zoo": ("zoo", "zoo", "List the network architectures medseg can build and train."),
}


class LazyGroup(click.Group):
    """A click group that imports a sub-command's module only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [name for name in COMMANDS if self._available(name)]

    @staticmethod
    def _available(name: str) -> bool:
        module = COMMANDS[name][0]
        return importlib.util.find_spec(f"medseg_cli.commands.{module}") is not None

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS or not self._available(name):
            return None
        module_name, attribute, _ = COMMANDS[name]
        module = importlib.import_module(f"medseg_cli.commands.{module_name}")
        return getattr(module, attribute)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="medseg")
def main() -> None:
    """medseg: segment medical scans (CT, MRI, ultrasound, fundus) with attention and multi-scale
    networks; train your own; measure the result in millimetres. Works offline.

    \b
    Exit codes: 0 success, 2 bad input, 3 model or weights problem, 4 runtime failure.
    Every command takes --json (machine output), --quiet (no progress) and --debug (tracebacks).
    """


if __name__ == "__main__":  # pragma: no cover
    main()
