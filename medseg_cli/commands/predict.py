"""``medseg predict INPUT... -o OUTPUT --model NAME|PATH``: segment scans; masks keep the input's geometry."""

from __future__ import annotations

import sys
from pathlib import Path

import click
from rich.table import Table

from ..atomic import check_output_path, ensure_writable_folder
from ..console import Console, command_options, escape
from ..errors import InputError
from ..imaging import PLANAR_SUFFIXES, file_suffix, read_channels
from ..inference.cascade import CascadePredictor, is_cascade_path, load_cascade
from ..inference.cohort import Case, discover_cases, parse_shard, run_cases, select_shard
from ..inference.postprocess import (PROBABILITY_DTYPES, check_lossless, is_slicer_segmentation, write_labels,
                                     write_probabilities)
from ..inference.predictor import Predictor, check_channels
from ..inference.runners import DEVICES, PRECISIONS, load_runner
from ..inference.streaming import check_stream, picture_geometry, should_stream, stream_predict, stream_problem
from ..sizes import size_columns, size_rows, size_text, size_unit

OUTPUT_FORMATS = (".nii.gz", ".nii", ".nrrd", ".seg.nrrd", ".mha", ".png", ".tif")  # .png / .tif: 2D only


def _default_model() -> str:
    try:
        from ..weights import default_model_name
    except ImportError:
        return "hippocampus"
    return default_model_name()


def _check_output_name(path: Path, what: str) -> None:
    """Raise :class:`InputError` unless ``path`` is a writable, lossless image file name."""
    if not (file_suffix(path) or is_slicer_segmentation(path)):
        raise InputError(f"unsupported {what} file type", path=path,
                         hint="Use .nii.gz, .nii, .nrrd, .seg.nrrd or .mha (or .png/.tif for 2D).")
    check_lossless(path)
    check_output_path(path)


def _size_table(rows: list[dict], unit: str) -> Table:
    """Per label: volume (mm³, mL) for a 3D scan, area (mm², or pixels for PNG/JPEG/TIFF) for a 2D picture."""
    table = Table(title_justify="left")
    table.add_column("label", justify="right")
    table.add_column("name")
    columns = size_columns(unit)
    for heading, _ in columns:
        table.add_column(heading, justify="right")
    for row in rows:
        table.add_row(str(row["label"]), escape(row["name"]), *(cell(row) for _, cell in columns))
    return table


def _streamed(stream: bool | None, cohort: bool, case: Case, probs_path: Path | None, keep_largest: bool,
              predictor: Predictor) -> bool:
    """Whether this case is predicted tile by tile (``--stream``, or automatic for big 2D pictures)."""
    if stream is False:
        return False
    streamable = not (cohort or len(case.paths) != 1 or probs_path is not None or keep_largest
                      or type(predictor) is not Predictor)
    if stream:
        if not streamable:
            raise InputError("--stream takes one picture and a plain model, without --probabilities or --keep-largest",
                             path=case.paths[0], hint="Drop --stream, or predict one file.")
        return True
    return (streamable and should_stream(case.paths[0])
            and stream_problem(predictor.card, predictor.preprocessor, picture_geometry(case.paths[0])) is None)


def _foveation_map_predictor(predictor, path: Path | None, cohort: bool):
    """The predictor of ``--foveation-map`` (None without it); refused for cohorts and non-foveation models."""
    if path is None:
        return None
    if cohort:
        raise InputError("--foveation-map takes one input, not a cohort", path=path, hint="Predict one image.")
    from ..inference.foveation_map import foveation_map_predictor

    _check_output_name(path, "foveation map")
    return foveation_map_predictor(predictor)


def _with_foveation_map(process, map_predictor, path: Path, series_uid: str | None, progress, console: Console):
    """``process`` followed by writing the case's foveation map (row keys ``foveation_map``, ``views``)."""
    from ..inference.foveation_map import write_foveation_map

    def run(case: Case) -> dict:
        row = process(case)
        if "status" not in row:  # segmented (not skipped)
            row["views"] = write_foveation_map(map_predictor, case.paths, path, streamed=bool(row.get("streamed")),
                                               series_uid=series_uid, progress=progress)
            row["foveation_map"] = str(path)
            total = max(sum(v["voxels"] for v in row["views"]), 1)
            console.info(f"foveation map {escape(str(path))}: " + ", ".join(
                f"{escape(v['name'])} {100 * v['voxels'] / total:.1f}%" for v in row["views"]))
        return row

    return run


@click.command(name="predict")
@click.argument("inputs", nargs=-1, type=click.Path(path_type=str))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
              help="Mask file (.nii.gz, .nrrd, .mha; .seg.nrrd = 3D Slicer segmentation), or a folder for a cohort.")
@click.option("-m", "--model", default=None, help="Model name (see `medseg models`), path to .onnx / checkpoint .pt, or a locator->segmenter cascade card (.cascade.json).")
@click.option("--backend", type=click.Choice(["onnx", "torch"]), default="onnx", show_default=True,
              help="ONNX Runtime, or torch for a checkpoint.")
@click.option("--device", type=click.Choice(DEVICES), default="auto", show_default=True,
              help="auto: CUDA when usable, else CPU.")
@click.option("--precision", type=click.Choice(PRECISIONS), default="fp32", show_default=True,
              help="Torch back end: bf16 = bfloat16 mixed precision, 2-3x faster on CPUs with AVX512-BF16/AMX "
                   "(fp16 on CUDA); needs a torch checkpoint such as the hippocampus-torch model.")
@click.option("--channels", default=None,
              help="Channel files of one case, comma-separated or a glob, in the model's channel order.")
@click.option("--overlap", type=float, default=0.5, show_default=True, help="Fraction shared by neighbouring windows.")
@click.option("--batch", "batch_size", type=click.IntRange(min=1), default=1, show_default=True,
              help="Windows per network call.")
@click.option("--tta", is_flag=True, help="Average over every flip of the spatial axes (8x slower in 3D).")
@click.option("--probabilities", "probabilities_path", type=click.Path(path_type=Path), default=None,
              help="Also write per-class probabilities (4D NIfTI / multi-component); a folder for a cohort.")
@click.option("--prob-dtype", type=click.Choice(PROBABILITY_DTYPES), default="float32", show_default=True,
              help="Probability storage: float32, or uint8 = round(p * 255), a quarter of the size "
                   "(NIfTI and NRRD have no float16 type).")
@click.option("--keep-largest", is_flag=True, help="Keep only the largest connected component of each label.")
@click.option("--pad", "pad_mode", type=click.Choice(["constant", "edge"]), default="constant", show_default=True,
              help="How input beyond the volume's edge is filled (constant = 0 after normalisation).")
@click.option("--shard", default=None, help="Cohort: process the i-th of n disjoint shares (i/n, 1-based).")
@click.option("--overwrite", is_flag=True, help="Cohort: redo cases whose output already exists.")
@click.option("--format", "out_format", type=click.Choice(OUTPUT_FORMATS), default=".nii.gz", show_default=True,
              help="Cohort: output file type (.png / .tif for 2D images only).")
@click.option("--series", "series_uid", default=None, help="DICOM SeriesInstanceUID when a folder holds several.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads (default: physical cores).")
@click.option("--offline", is_flag=True, help="Never download: use only cached models.")
@click.option("--stream/--no-stream", "stream", default=None,
              help="Predict a large 2D picture tile by tile with bounded memory (an uncompressed .mha/.mhd is "
                   "memory-mapped, other formats are read once as stored; a non-.mha mask is converted at the "
                   "end; default: automatic above 64 megapixels when the model allows it).")
@click.option("--foveation-map", "foveation_map", type=click.Path(path_type=Path), default=None,
              help="Foveation models, one input: also write, on the input's grid, the index of the field-of-view "
                   "view each pixel was segmented from (0 = the smallest view); a second pass of the network.")
@command_options
def predict(inputs: tuple[str, ...], output: Path, model: str | None, backend: str, device: str, precision: str,
            channels: str | None, overlap: float, batch_size: int, tta: bool, probabilities_path: Path | None,
            prob_dtype: str, keep_largest: bool, pad_mode: str, shard: str | None, overwrite: bool,
            out_format: str, series_uid: str | None, threads: int | None, offline: bool, stream: bool | None,
            foveation_map: Path | None, console: Console) -> None:
    """Segment INPUT with a model and write the mask on the input's exact grid (shape, spacing,
    origin, direction).

    \b
    INPUT is a scan file, a DICOM series folder, several files (the channels of one case, in the
    model's channel order), or, for a cohort, a folder of scans or a CSV list (OUTPUT is then a
    folder; multi-channel cases in a folder are named case_0000.nii.gz, case_0001.nii.gz, ...).
    Cohorts load the model once, skip cases already done (unless --overwrite), continue past a
    failing case and exit with the highest error code at the end. Label volumes (mm³) are printed;
    for a 2D picture label areas (mm², or pixels for PNG/JPEG/TIFF, which store no physical size).
    """
    shard_spec = parse_shard(shard)
    progress = console.progress()
    if is_cascade_path(model):  # a locator -> segmenter cascade card (*.cascade.json): both stages run
        runner = load_cascade(model, backend=backend, device=device, threads=threads, offline=offline,
                              progress=progress, precision=precision)
        predictor_type = CascadePredictor
    else:
        runner = load_runner(model or _default_model(), backend=backend, device=device, threads=threads,
                             offline=offline, progress=progress, precision=precision)
        predictor_type = Predictor
    card = runner.card
    cases, cohort = discover_cases(list(inputs), card, channels)
    predictor = predictor_type(runner, overlap=overlap, tta=tta, batch_size=batch_size, keep_largest=keep_largest,
                               pad_mode=pad_mode)
    map_predictor = _foveation_map_predictor(predictor, foveation_map, cohort)
    announced = []

    def announce() -> None:  # once, when the first scan is known to fit (so a bad input gives one line only)
        if not announced:
            announced.append(True)
            console.info(f"model {card.name} ({card.architecture}, {card.num_classes} classes) on "
                         f"{runner.description}")

    if cohort:
        if output.exists() and not output.is_dir():
            raise InputError("a cohort needs an output folder, this is a file", path=output,
                             hint="Give a folder with -o.")
        ensure_writable_folder(output)
        if probabilities_path is not None:
            ensure_writable_folder(probabilities_path)
        selected = select_shard(cases, shard_spec)
    else:
        if shard_spec is not None:
            raise InputError("--shard needs a cohort (a folder or CSV of cases)")
        selected = cases
        if output.is_dir():
            output = output / f"{selected[0].name}.nii.gz"
        _check_output_name(output, "output")
        if probabilities_path is not None:
            _check_output_name(probabilities_path, "probabilities")

    def destinations(case: Case) -> tuple[Path, Path | None]:
        if not cohort:
            return output, probabilities_path
        probs = probabilities_path / f"{case.name}_probabilities.nii.gz" if probabilities_path else None
        return output / f"{case.name}{out_format}", probs

    def process(case: Case) -> dict:
        mask_path, probs_path = destinations(case)
        inputs = {p.resolve() for p in case.paths}
        for target in (mask_path, probs_path):
            if target is not None and target.resolve() in inputs:
                raise InputError("the output would overwrite the input scan", path=target,
                                 hint="Write masks to another file or folder (-o).")
        if cohort and not overwrite and mask_path.exists() and (probs_path is None or probs_path.exists()):
            return {"status": "skipped", "output": str(mask_path), "reason": "output exists (use --overwrite)"}
        if _streamed(stream, cohort, case, probs_path, keep_largest, predictor):
            picture = check_stream(predictor, case.paths[0], mask_path)
            announce()
            rows = stream_predict(predictor, picture, mask_path, progress=progress)  # frees its pixels when done
            unit = size_unit(case.paths[0], (1,))  # streaming takes 2D pictures only
            return {"output": str(mask_path), "probabilities": None, "size_unit": unit,
                    "volumes": size_rows(rows, unit, picture.geometry), "streamed": True}
        scan = [read_channels(case.paths, series_uid=series_uid)]
        check_channels(scan[0], card)
        if file_suffix(mask_path) in PLANAR_SUFFIXES and not scan[0].is_planar:  # refused before predicting
            raise InputError(f"a {scan[0].spatial_shape} volume cannot be stored as {file_suffix(mask_path)}",
                             path=mask_path, hint="Use .nii.gz, .nrrd or .mha for 3D data.")
        unit = size_unit(case.paths[0], scan[0].spatial_shape)  # 2D pictures: areas, not volumes
        announce()
        # the scan is handed over (popped) so the predictor can free its voxels once the network input is built
        result = predictor.predict(scan.pop(), probabilities=probs_path is not None, progress=progress)
        if probs_path is not None:  # probabilities first: the mask's presence marks a finished case
            write_probabilities(result.probabilities.array, result.probabilities.geometry, probs_path, prob_dtype)
        write_labels(result.labels, mask_path, card)
        return {"output": str(mask_path), "probabilities": str(probs_path) if probs_path else None,
                "size_unit": unit, "volumes": size_rows(result.rows, unit, result.labels.geometry)}

    if map_predictor is not None:  # --foveation-map: written after the case's mask, streamed when the mask was
        process = _with_foveation_map(process, map_predictor, foveation_map, series_uid, progress, console)

    def show(row: dict) -> None:
        if not cohort or console.json_mode:
            return
        if row["status"] == "ok":
            summary = ", ".join(f"{v['name']} {size_text(v)}" for v in row["volumes"])
            console.print(f"[green]ok[/green]      {escape(row['case'])} -> {escape(row['output'])} ({escape(summary)})")
        elif row["status"] == "skipped":
            console.print(f"[dim]skipped[/dim] {escape(row['case'])}: {escape(row['reason'])}")
        else:
            console.print(f"[red]failed[/red]  {escape(row['case'])}: {escape(row['error'])}")

    if cohort:
        with progress.task("cases", total=len(selected)) as task:
            def advance(row: dict) -> None:
                show(row)
                task.advance(1)

            rows, worst = run_cases(selected, process, on_result=advance)
    else:
        rows = [{"case": selected[0].name, "inputs": [str(p) for p in selected[0].paths], "status": "ok",
                 **process(selected[0])}]
        worst = 0

    counts = {status: sum(r["status"] == status for r in rows) for status in ("ok", "skipped", "failed")}
    data = {"model": card.name, "backend": runner.description, "cohort": cohort,
            "shard": list(shard_spec) if shard_spec else None, "summary": counts, "cases": rows}

    def render() -> None:
        if cohort:
            console.print(f"{counts['ok']} segmented, {counts['skipped']} skipped, {counts['failed']} failed"
                          + (f" (shard {shard_spec[0]}/{shard_spec[1]} of {len(cases)} cases)" if shard_spec else ""))
        else:
            row = rows[0]
            console.print(f"wrote {escape(row['output'])}" +
                          (f" and {escape(row['probabilities'])}" if row.get("probabilities") else ""))
            console.print(_size_table(row["volumes"], row["size_unit"]))

    console.emit(data, render=render)
    if worst:
        sys.exit(worst)
