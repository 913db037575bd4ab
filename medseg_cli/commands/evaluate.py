"""``medseg eval PREDICTIONS LABELS``: compare predictions with reference label maps."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ..console import Console, command_options, escape
from ..errors import InputError


def _parse_int_list(text: str, option: str, names: dict[str, int] | None = None) -> tuple[int, ...]:
    values = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        if names and item in names:
            values.append(names[item])
            continue
        try:
            values.append(int(item))
        except ValueError:
            raise InputError(f"{option} {text!r}: {item!r} is not an integer label"
                             + (" or a name from --label-names" if names else ""),
                             hint=f"Write e.g. {option} 1,2") from None
    if not values:
        raise InputError(f"{option} {text!r} names no label", hint=f"Write e.g. {option} 1,2")
    return tuple(values)


def _is_integer(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def read_label_names(path: str) -> dict[int, str]:
    """{value: name} from JSON given inline or as a file: ``{"1": "liver"}``, ``{"liver": 1}`` or
    ``{"labels": {...}}`` (a model card)."""
    inline = path.lstrip().startswith("{")
    file = None if inline else Path(path)  # inline JSON is no file to name in errors
    try:
        data = json.loads(path if file is None else file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("label-names file not found", path=file, hint="Check the --label-names path.") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"--label-names is not readable JSON ({err})", path=file,
                         hint='Write e.g. {"1": "liver", "2": "spleen"}') from None
    if isinstance(data, dict) and isinstance(data.get("labels"), dict):
        data = data["labels"]
    if not isinstance(data, dict) or not data:
        raise InputError("label names must be a JSON object", path=file, hint='Write e.g. {"1": "liver"}')
    names: dict[int, str] = {}
    for key, value in data.items():
        try:
            if isinstance(value, int) and not isinstance(value, bool):
                names[int(value)] = str(key)
            else:
                names[int(key)] = str(value)
        except (TypeError, ValueError):
            raise InputError(f"entry {key!r}: {value!r} maps no integer label to a name", path=file,
                             hint='Write e.g. {"1": "liver"}') from None
    return names


def read_label_map_option(text: str) -> tuple[tuple[tuple[int, ...], int], ...]:
    """``--label-map``: training's ``data.label_map`` syntax (``{"0,0,0": 0, "128,0,0": 1}``: raw value or
    "R,G,B" colour -> class), inline JSON/YAML or a YAML/JSON file; a file may also be a training
    config (its ``data.label_map`` is used). Returns ``((raw values...), class)`` pairs."""
    import yaml

    from ..training.config import parse_label_map

    inline = text.lstrip().startswith("{")
    file = Path(text)
    source = None if inline else file
    try:
        data = yaml.safe_load(text if inline else file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError("label-map file not found", path=file, hint="Check the --label-map path.") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        problem = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise InputError(f"--label-map is not readable JSON/YAML ({problem})", path=source,
                         hint='Write e.g. --label-map \'{"0,0,0": 0, "128,0,0": 1}\'') from None
    if isinstance(data, dict) and isinstance(data.get("data"), dict) and "label_map" in data["data"]:
        data = data["data"]["label_map"]  # a training config
    elif isinstance(data, dict) and isinstance(data.get("label_map"), dict):
        data = data["label_map"]
    if not isinstance(data, dict) or not data:
        raise InputError("--label-map must be a mapping {raw value or \"R,G,B\": class}", path=source,
                         hint='Write e.g. {"0,0,0": 0, "128,0,0": 1, "0,128,0": 2}')
    try:
        parsed = parse_label_map(data)
    except ValueError as err:
        raise InputError(f"--label-map: {err}", path=source,
                         hint='Write e.g. {"0,0,0": 0, "128,0,0": 1, "0,128,0": 2}') from None
    for raw, label in parsed.items():
        if isinstance(label, bool) or not isinstance(label, int) or label < 0:
            raise InputError(f"--label-map: {','.join(map(str, raw))!r} maps to {label!r}, not a label >= 0",
                             path=source, hint='Write e.g. {"0,0,0": 0, "128,0,0": 1}')
        if any(not 0 <= v <= 65535 for v in raw):
            raise InputError(f"--label-map: raw value {','.join(map(str, raw))!r} is outside 0..65535",
                             path=source)
    return tuple(parsed.items())


def parse_regions(specs: tuple[str, ...], names: dict[str, int]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    """``NAME=1,3`` specs -> ``((name, values), ...)``; ``names`` is {label name: value} (--label-names).

    A region's rows share the report's name column with the labels', so a region named like a label
    (a --label-names name, or an integer: the name of an unnamed label) is refused, never shadowed.
    """
    regions = []
    for spec in specs:
        name, sep, values = spec.partition("=")
        name = name.strip()
        if not sep or not name:
            raise InputError(f"--region {spec!r} is not NAME=LABELS", hint="Write e.g. --region tumour_core=1,3")
        if name in names:
            raise InputError(f"--region {spec!r}: {name!r} is already the name of label {names[name]} "
                             "(--label-names); a region and a label cannot share a name",
                             hint=f"Give the region another name, e.g. --region {name}_region={values.strip()}")
        if _is_integer(name):
            raise InputError(f"--region {spec!r}: {name!r} is the name of label {int(name)} in the report; "
                             "a region and a label cannot share a name",
                             hint=f"Give the region a name that is not a number, e.g. --region region_{name}="
                                  f"{values.strip()}")
        regions.append((name, _parse_int_list(values, "--region", names)))
    seen = [name for name, _ in regions]
    if len(seen) != len(set(seen)):
        raise InputError("two regions share a name", hint="Give every --region its own name.")
    return tuple(regions)


def parse_tolerances(specs: tuple[str, ...]) -> tuple[float, tuple[tuple[str, float], ...]]:
    """``--tolerance 1`` (default mm) and/or ``--tolerance 1=2.0,liver=1.5`` (per label / region)."""
    default, per_label = 1.0, []
    for spec in specs:
        for item in (part.strip() for part in spec.split(",")):
            if not item:
                continue
            key, sep, value = item.rpartition("=")
            try:
                number = float(value)
            except ValueError:
                raise InputError(f"--tolerance {spec!r}: {value!r} is not a number of mm",
                                 hint="Write e.g. --tolerance 1 or --tolerance 1=2.0,2=1.5") from None
            if not number >= 0:
                raise InputError(f"--tolerance {spec!r}: tolerance must be >= 0 mm")
            if sep:
                per_label.append((key.strip(), number))
            else:
                default = number
    return default, tuple(per_label)


def _render(console: Console, report: dict) -> None:
    from ..evaluation.report import summary_table

    console.print(summary_table(report))


@click.command(name="eval")
@click.argument("predictions", required=False, type=click.Path(path_type=str))
@click.argument("labels", required=False, type=click.Path(path_type=str))
@click.option("-o", "--output", "output", default=None, type=click.Path(path_type=str),
              help="Folder for per_case.csv and summary.json.")
@click.option("--labels", "label_list", default=None, metavar="1,2",
              help="Label values (or names) to evaluate [default: every non-zero label found].")
@click.option("--label-names", default=None, type=click.Path(path_type=str), metavar="JSON",
              help='Names of the labels, inline JSON or a JSON file: {"1": "liver", ...} (a model card works too).')
@click.option("--label-map", "label_map", default=None, metavar="JSON|YAML",
              help='Map colour-coded (or other raw-valued) masks to labels before scoring, in the syntax of '
                   'training\'s data.label_map: inline JSON or a JSON/YAML file (a training config works too), '
                   'e.g. {"0,0,0": 0, "128,0,0": 1, "0,128,0": 2}. Applies to every prediction and reference '
                   'with as many channels as the keys have values; a colour not listed is an error.')
@click.option("--region", "regions", multiple=True, metavar="NAME=1,3",
              help="A merged region evaluated as one mask (repeatable), e.g. tumour_core=1,3.")
@click.option("--tolerance", "tolerances", multiple=True, metavar="MM | LABEL=MM,...",
              help="NSD tolerance in mm [1]; per label or region: 1=2.0,2=1.5.")
@click.option("--surface", "convention", type=click.Choice(["element", "voxel"]), default="element",
              show_default=True,
              help="element: area-weighted surface elements (DeepMind surface-distance); voxel: border voxels (MedPy).")
@click.option("--pairs", "pairs_csv", default=None, type=click.Path(path_type=str), metavar="CSV",
              help="CSV listing case,prediction,reference instead of pairing by file name.")
@click.option("--resample-prediction", is_flag=True,
              help="Resample a prediction on another grid onto its reference (nearest neighbour) instead of refusing.")
@click.option("--fov-mask", default=None, type=click.Path(path_type=str), metavar="MASK",
              help="Mask file, or folder of per-case masks: metrics count only voxels inside it.")
@click.option("--jobs", "-j", default=1, type=click.IntRange(min=1), show_default=True,
              help="Cases evaluated in parallel (processes).")
@command_options
def evaluate(predictions: str | None, labels: str | None, output: str | None, label_list: str | None,
             label_names: str | None, label_map: str | None, regions: tuple[str, ...], tolerances: tuple[str, ...],
             convention: str, pairs_csv: str | None, resample_prediction: bool, fov_mask: str | None, jobs: int,
             console: Console) -> None:
    """Compare PREDICTIONS with reference LABELS (each a label-map file or a folder of them, paired
    by case name): Dice, IoU, precision, recall, specificity, volumes, HD, HD95, ASSD, mean surface
    distances and normalised surface Dice, in mm, per case and label; mIoU/mPA over all classes.
    Colour-coded masks (RGB PNGs) are scored after --label-map turns them into labels.
    Exact definitions and the empty-mask rules: docs/metrics.md."""
    from ..evaluation.cohort import EvalOptions, aggregate, evaluate_pairs, report_warnings
    from ..evaluation.pairing import pair_by_name, pairs_from_csv
    from ..evaluation.report import write_reports

    if pairs_csv is not None:
        if predictions or labels:
            raise InputError("give either PREDICTIONS LABELS or --pairs CSV, not both")
        pairing = pairs_from_csv(pairs_csv)
    elif predictions and labels:
        pairing = pair_by_name(predictions, labels)
    else:
        raise InputError("missing PREDICTIONS and LABELS", hint="Run: medseg eval PREDICTIONS LABELS (files or "
                                                                "folders), or medseg eval --pairs pairs.csv")
    names = read_label_names(label_names) if label_names else {}
    by_name = {name: value for value, name in names.items()}
    chosen = _parse_int_list(label_list, "--labels", by_name) if label_list else None
    if chosen is None and names:
        chosen = tuple(sorted(v for v in names if v != 0))
    default_tolerance, per_label = parse_tolerances(tolerances)
    options = EvalOptions(labels=chosen, label_names=tuple(sorted(names.items())),
                          regions=parse_regions(regions, by_name), tolerance_mm=default_tolerance,
                          tolerances=per_label, convention=convention, resample_prediction=resample_prediction,
                          fov_mask=fov_mask, label_map=read_label_map_option(label_map) if label_map else ())
    results = evaluate_pairs(pairing, options, jobs=jobs, progress=console.progress())
    report = aggregate(results, options, pairing)
    for line in report_warnings(report):
        console.warn(line)
    if output:
        written = write_reports(report, output)
        report["report_files"] = {key: str(path) for key, path in written.items()}
        console.info(f"wrote {escape(str(written['per_case_csv']))} and {escape(str(written['summary_json']))}")
    console.emit(report, render=lambda: _render(console, report))
