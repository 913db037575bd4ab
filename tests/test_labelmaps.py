"""Colour-coded masks <-> label maps, on the real ultrasound (RGB) and DRIVE (0/255) masks."""

from __future__ import annotations

import numpy as np
import pytest

from medseg_cli.errors import InputError
from medseg_cli.imaging import Image, read_image, write_image
from medseg_cli.labelmaps import (colors_to_labels, default_binary_table, labels_to_colors,
                                  parse_color_table, read_label_map)

LABELME = {0: [0, 0, 0], 1: [128, 0, 0], 2: [0, 128, 0]}


def test_ultrasound_rgb_mask_round_trips_through_labels(shared_data, tmp_path):
    path = shared_data / "ultrasound" / "masks" / "0000.png"
    rgb = read_image(path)
    labels = read_label_map(str(path), LABELME)
    assert labels.array.shape == (1, 512, 512)
    assert set(np.unique(labels.array)) <= {0, 1, 2}
    # each label sits exactly where its colour is
    for label, colour in LABELME.items():
        where = np.all(rgb.array == np.asarray(colour).reshape(3, 1, 1, 1), axis=0)
        assert np.array_equal(labels.array == label, where)
    back = labels_to_colors(labels.array, LABELME)
    assert np.array_equal(back, rgb.array)
    # and a written label PNG reads back identically
    out = write_image(labels, tmp_path / "labels.png", label=True)
    assert np.array_equal(read_image(out).array, labels.array)


def test_drive_binary_mask_with_grey_table(shared_data):
    path = shared_data / "drive" / "training" / "1st_manual" / "21_manual1.png"
    grey = read_image(path).array
    labels = read_label_map(str(path), default_binary_table())
    assert labels.array.dtype == np.uint8
    assert np.array_equal(labels.array == 1, grey == 255)
    assert 0 < labels.array.mean() < 0.5  # vessels are a minority of the image


def test_unknown_colour_is_an_error_naming_colour_count_and_position():
    colours = np.zeros((3, 1, 4, 4), dtype=np.uint8)
    colours[:, 0, 2, 3] = [10, 20, 30]
    with pytest.raises(InputError) as err:
        colors_to_labels(colours, LABELME, source="mask.png")
    message = str(err.value)
    assert message.startswith("mask.png:")
    assert "[10, 20, 30]" in message and "1 pixels" in message and "(0, 2, 3)" in message


def test_rgb_mask_without_table_is_a_clear_error(shared_data):
    with pytest.raises(InputError, match="colour channels"):
        read_label_map(str(shared_data / "ultrasound" / "masks" / "0000.png"))


@pytest.mark.parametrize("table, problem", [
    ({}, "non-empty"),
    ({"a": [0, 0, 0]}, "not an integer"),
    ({0: [0, 0, 0], 1: [255, 0]}, "same number"),
    ({0: [0, 0, 0], 1: [0, 0, 0]}, "share the colour"),
    ({0: [0, 0, -1]}, "0..65535"),
])
def test_bad_colour_tables_are_refused(table, problem):
    with pytest.raises(InputError, match=problem):
        parse_color_table(table)


def test_labels_without_colour_are_refused():
    with pytest.raises(InputError, match=r"labels \[3\]"):
        labels_to_colors(np.array([[0, 3]]), LABELME)
