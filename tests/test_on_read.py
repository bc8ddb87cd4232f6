"""Correction on read, as a user meets it: DIALS_TRUNCFIX at dials.import,
the experiment list deciding everything later, in new processes."""

from __future__ import annotations

import json
import os
import pickle

import numpy as np
import pytest
from helpers import (
    install_plugin_camera,
    one_line_error,
    read_back,
    record_of,
    run,
    spot_count,
    write_plugin_image,
    write_truncated_mrc_stack,
)

import dxtbx
from dxtbx.model.experiment_list import ExperimentListFactory

from devtools.camera_files import write_pilatus_cbfs, write_timepix_smvs
from devtools.synthetic import (
    smv_geometry,
    truncate,
    write_truncated_smv_sweep,
)
from dials_truncfix import format_wrapper
from dials_truncfix.core.parameters import CorrectionParameters
from dials_truncfix.corrector import (
    NOT_VALID,
    corrector_for,
    image_identity,
    stock_zeros_valid,
)
from dials_truncfix.geometry import ShellGeometry, shell_geometry, shell_map_for
from dials_truncfix.settings import ENVIRONMENT_VARIABLE, Settings

SIZE = 384


@pytest.fixture(scope="module")
def smv_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("smv")
    paths, _ = write_truncated_smv_sweep(directory, n_images=3, size=SIZE, seed=1)
    return paths


@pytest.fixture(scope="module")
def simulated_sweep(tmp_path_factory):
    """A small realistic MicroED sweep (spots where DIALS predicts them)."""
    from devtools import simulate

    directory = tmp_path_factory.mktemp("sim")
    simulate.run(
        [
            f"output.directory={directory}",
            "image_size=512",
            "n_images=4",
            "seed=5",
            "output.truth_images=False",
        ]
    )
    return sorted(str(p) for p in (directory / "truncated").iterdir())


def header_correction(path, index=0, params=CorrectionParameters()):
    """The core's correction of a file with its header geometry (what the
    experiment says when nothing overrides it), independent of the readers."""
    image = format_wrapper.stock_format_class(path)(path)
    raw = (
        image.get_raw_data(index)
        if hasattr(image, "get_num_images")
        else image.get_raw_data()
    )
    raw = raw if isinstance(raw, tuple) else (raw,)
    beam = (
        image.get_beam(index) if hasattr(image, "get_num_images") else image.get_beam()
    )
    geometry = shell_geometry(beam, image.get_detector(), [image.get_static_mask()])
    corrected, _ = corrector_for(geometry, params).correct(
        raw, image_identity(path, index)
    )
    return np.concatenate(
        [p.as_numpy_array().ravel() for p in corrected]
    ), np.concatenate([p.as_numpy_array().ravel() for p in raw])


def stock_class_name(path):
    """The class stock dxtbx reads ``path`` with, chosen without the plugin's
    help (the variable unset: the dispatchers claim nothing)."""
    assert not os.environ.get(ENVIRONMENT_VARIABLE)
    return type(dxtbx.load(path)).__name__


def import_on_read(files, workdir, expected_format, images=None, **env):
    """DIALS_TRUNCFIX=1 dials.import, then dials.find_spots and a read-back in
    new processes without the variable: the core's correction of the raw
    files, with many negative values, none of them masked."""
    images = images or [(f, 0) for f in files]
    run(
        ["dials.import", *files, "output.experiments=imported.expt"],
        workdir,
        DIALS_TRUNCFIX="1",
        **env,
    )
    # noise-only test images: allow any number of strong pixels
    run(
        ["dials.find_spots", "imported.expt", "nproc=2", "max_strong_pixel_fraction=1"],
        workdir,
        **env,
    )
    info, pixels, masks = read_back("imported.expt", workdir, **env)
    assert info["format"] == expected_format
    assert len(pixels) == len(images)
    for data, mask, (path, index) in zip(pixels, masks, images):
        expected, raw = header_correction(path, index)
        assert np.array_equal(data, expected)
        assert np.array_equal(data[raw > 0], raw[raw > 0])
        assert (data < 0).sum() > 1000 and mask[data < 0].all()
    return info, pixels


# --- the switch ---------------------------------------------------------------------


def test_variable_unset_reads_exactly_as_stock(smv_sweep, monkeypatch):
    monkeypatch.delenv(ENVIRONMENT_VARIABLE, raising=False)
    image = dxtbx.load(smv_sweep[0])
    stock = format_wrapper.stock_format_class(smv_sweep[0])
    assert type(image) is stock and stock.__name__ == "FormatSMVADSC"
    reference = stock(smv_sweep[0])
    assert image.get_detector() == reference.get_detector()
    assert np.array_equal(
        image.get_raw_data().as_numpy_array(), reference.get_raw_data().as_numpy_array()
    )


def test_image_files_become_corrected_imagesets_in_any_program(
    smv_sweep, tmp_path, monkeypatch
):
    """Here the program is pytest: image files made into imagesets are
    corrected; a format instance on its own and an experiment list written
    without the variable are read as stock."""
    expt = str(tmp_path / "stock.expt")
    ExperimentListFactory.from_filenames(smv_sweep).as_file(expt)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "1")
    assert type(dxtbx.load(smv_sweep[0])).__name__ == "FormatSMVADSC"
    iset = ExperimentListFactory.from_filenames(smv_sweep)[0].imageset
    assert iset.get_format_class().__name__ == "Truncfix_FormatSMVADSC"
    expected, _ = header_correction(smv_sweep[0])
    assert np.array_equal(iset.get_raw_data(0)[0].as_numpy_array().ravel(), expected)
    from dxtbx.model.experiment_list import ExperimentList

    assert (
        ExperimentList.from_file(expt)[0].imageset.get_format_class().__name__
        == "FormatSMVADSC"
    )


def test_experiment_list_reads_as_written_whatever_the_variable_says(
    smv_sweep, tmp_path, monkeypatch
):
    """Even a value dials.import would refuse is not read when an experiment list is decoded."""
    from dxtbx.model.experiment_list import ExperimentList

    expt = str(tmp_path / "stock.expt")
    ExperimentListFactory.from_filenames(smv_sweep).as_file(expt)
    monkeypatch.setenv(ENVIRONMENT_VARIABLE, "yes")
    assert (
        ExperimentList.from_file(expt)[0].imageset.get_format_class().__name__
        == "FormatSMVADSC"
    )


# --- mixed imports: each truncating imageset corrected, in any company and order ---


@pytest.fixture(scope="module")
def mixed_files(tmp_path_factory):
    """Named so that dials.import's sorting puts them in the order of each case:
    copies of a real TimePix frame, truncated ADSC sweeps, an MRC stack, Pilatus CBFs."""
    from helpers import realdata

    timepix = realdata("TIMEPIX_SU_512-stdgoni_0001.img")
    root = tmp_path_factory.mktemp("mixed")
    files = {}
    (root / "m_tpx").mkdir()
    files["tpx"] = []
    for k in (1, 2):
        path = root / "m_tpx" / f"timepix_{k:05d}.img"
        path.write_bytes(open(timepix, "rb").read())
        files["tpx"].append(str(path))
    for name in ("a_adsc", "z_adsc"):
        files[name], _ = write_truncated_smv_sweep(
            root / name, n_images=2, size=256, seed=len(files)
        )
    (root / "s_mrc").mkdir()
    files["s_mrc"] = [write_truncated_mrc_stack(root / "s_mrc" / "stack.mrc")]
    (root / "b_pilatus").mkdir()
    files["b_pilatus"] = write_pilatus_cbfs(root / "b_pilatus")
    return root, files


#: (files by kind, in dials.import's sorted order) per case; ADSC and MRC truncate, TimePix and Pilatus count
MIXED_CASES = {
    "adsc_last": ["tpx", "z_adsc"],
    "adsc_first": ["a_adsc", "tpx"],
    "adsc_middle": ["b_pilatus", "tpx", "z_adsc"],
    "single_adsc_last": ["tpx", "z_adsc:1"],
    "single_timepix_first": ["tpx:1", "z_adsc"],
    "mrc_between": ["tpx", "s_mrc", "z_adsc"],
    "pilatus_cbf_first": ["b_pilatus", "z_adsc:1"],
    "both_adsc_around": ["a_adsc", "tpx", "z_adsc:1"],
}
TRUNCATING = ("a_adsc", "z_adsc", "s_mrc")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(MIXED_CASES))
def test_mixed_import_corrects_every_truncating_imageset(mixed_files, tmp_path, case):
    """Counting-detector files sorting before, after or between truncated
    ones: each truncating imageset is corrected, each counting one reads as
    stock, and one console line names each uncorrected imageset."""
    root, files = mixed_files
    chosen = []
    for item in MIXED_CASES[case]:
        kind, _, count = item.partition(":")
        chosen.append((kind, files[kind][: int(count)] if count else files[kind]))
    paths = [p for _, kind_paths in chosen for p in kind_paths]
    assert paths == sorted(paths)
    result = run(
        ["dials.import", *paths, "output.experiments=mixed.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    run(["dials.import", *paths, "output.experiments=stock.expt"], tmp_path)
    corrected, stock = (
        json.loads((tmp_path / f"{n}.expt").read_text())["imageset"]
        for n in ("mixed", "stock")
    )
    assert len(corrected) == len(stock)
    notices = [
        line
        for line in result.stdout.splitlines()
        if line.startswith(f"{ENVIRONMENT_VARIABLE}: ")
    ]
    n_counting = 0
    by_file = {
        format_wrapper.to_path(i.get("template") or i["images"][0]): i
        for i in corrected
    }
    for (
        plain
    ) in stock:  # stock dxtbx lists them by format class, the plugin in file order
        name = plain.get("template") or plain["images"][0]
        on_read = by_file[name]
        kind = os.path.basename(os.path.dirname(name))
        if kind in TRUNCATING:
            assert (on_read.get("template") or on_read["images"][0]).startswith(
                "truncfix://"
            ), name
            assert on_read["params"]["truncfix"]["version"] == 2
        else:
            n_counting += 1
            assert on_read == plain
    assert len(notices) == n_counting and all(
        "counting detector" in line for line in notices
    ), notices
    assert any(k in TRUNCATING for k, _ in chosen) and n_counting > 0


@pytest.mark.slow
def test_images_given_to_find_spots_read_as_imported(simulated_sweep, tmp_path):
    """Image files handed straight to a DIALS program are corrected as
    dials.import would: the same strong spots."""
    env = {ENVIRONMENT_VARIABLE: "1"}
    run(
        ["dials.import", *simulated_sweep, "output.experiments=imported.expt"],
        tmp_path,
        **env,
    )
    common = ["nproc=2", "max_strong_pixel_fraction=1"]
    imported = run(
        [
            "dials.find_spots",
            "imported.expt",
            *common,
            "output.reflections=imported.refl",
        ],
        tmp_path,
        **env,
    )
    direct = run(
        [
            "dials.find_spots",
            *simulated_sweep,
            *common,
            "output.reflections=direct.refl",
        ],
        tmp_path,
        **env,
    )
    stock = run(
        [
            "dials.find_spots",
            *simulated_sweep,
            *common,
            "output.reflections=stock.refl",
        ],
        tmp_path,
    )
    assert spot_count(direct) == spot_count(imported) != spot_count(stock)
    from dials.array_family import flex

    a, b = (
        flex.reflection_table.from_file(str(tmp_path / f"{n}.refl"))
        for n in ("direct", "imported")
    )
    assert np.array_equal(
        np.array(a["xyzobs.px.value"]), np.array(b["xyzobs.px.value"])
    )


@pytest.mark.slow
def test_stills_given_to_find_spots_read_as_imported(tmp_path):
    """Stills (zero-width images) handed straight to dials.find_spots: the
    shell geometry comes from the imageset the program builds."""
    paths, _ = write_truncated_smv_sweep(
        tmp_path / "data", n_images=2, size=256, seed=6, osc_width=0.0, spots=80
    )
    env = {ENVIRONMENT_VARIABLE: "1"}
    run(["dials.import", *paths, "output.experiments=imported.expt"], tmp_path, **env)
    common = ["nproc=1", "max_strong_pixel_fraction=1"]
    imported = run(
        [
            "dials.find_spots",
            "imported.expt",
            *common,
            "output.reflections=imported.refl",
        ],
        tmp_path,
        **env,
    )
    direct = run(
        ["dials.find_spots", *paths, *common, "output.reflections=direct.refl"],
        tmp_path,
        **env,
    )
    stock = run(
        ["dials.find_spots", *paths, *common, "output.reflections=stock.refl"], tmp_path
    )
    assert spot_count(direct) == spot_count(imported) != spot_count(stock)


@pytest.mark.slow
def test_stock_experiment_list_reads_as_stock_with_the_variable_exported(
    simulated_sweep, tmp_path
):
    """The switch does not leak: an experiment list imported without the
    variable gives the same spots, pixels, masks and trusted range whether
    or not it is exported later, and whatever its value."""
    run(["dials.import", *simulated_sweep, "output.experiments=stock.expt"], tmp_path)
    counts = {}
    for value in (None, "1", "yes"):
        env = {} if value is None else {ENVIRONMENT_VARIABLE: value}
        found = run(
            [
                "dials.find_spots",
                "stock.expt",
                "nproc=2",
                f"output.reflections=s{value}.refl",
            ],
            tmp_path,
            **env,
        )
        counts[value] = spot_count(found)
        info, pixels, masks = read_back("stock.expt", tmp_path, **env)
        assert info["format"] == "FormatSMVADSC"
        if value is None:
            reference = (info["trusted"], pixels, masks)
        else:
            assert info["trusted"] == reference[0]
            assert all(np.array_equal(a, b) for a, b in zip(pixels, reference[1]))
            assert all(np.array_equal(a, b) for a, b in zip(masks, reference[2]))
    assert counts["1"] == counts["yes"] == counts[None] > 0


@pytest.mark.slow
def test_import_find_spots_index_refine_with_the_variable_exported(tmp_path):
    """A realistic session with DIALS_TRUNCFIX exported throughout: the
    experiment list records the settings and the geometry fixed at import,
    and refinement changes no pixel (spot finding and integration read
    identical data)."""
    from devtools import simulate

    simulate.run(
        [
            f"output.directory={tmp_path / 'sim'}",
            "image_size=1024",
            "n_images=10",
            "seed=1",
            "output.truth_images=False",
            "output.nproc=2",
        ]
    )
    images = sorted(str(p) for p in (tmp_path / "sim" / "truncated").iterdir())
    env = {ENVIRONMENT_VARIABLE: "1"}
    run(["dials.import", *images], tmp_path, **env)
    record = record_of(tmp_path / "imported.expt")
    assert record["version"] == 2 and record["geometry"] is not None
    assert json.loads((tmp_path / "imported.expt").read_text())["imageset"][0][
        "template"
    ].startswith("truncfix://")
    run(["dials.find_spots", "imported.expt", "nproc=2"], tmp_path, **env)
    run(
        [
            "dials.index",
            "imported.expt",
            "strong.refl",
            "space_group=P43212",
            "unit_cell=67.3,67.3,101,90,90,90",
        ],
        tmp_path,
        **env,
    )
    run(["dials.refine", "indexed.expt", "indexed.refl"], tmp_path, **env)
    refined = json.loads((tmp_path / "refined.expt").read_text())
    assert (
        refined["detector"][0]
        != json.loads((tmp_path / "imported.expt").read_text())["detector"][0]
    )
    _, imported_pixels, _ = read_back("imported.expt", tmp_path)
    info, refined_pixels, masks = read_back("refined.expt", tmp_path)
    assert info["format"] == "Truncfix_FormatSMVADSC"
    for a, b, mask in zip(imported_pixels, refined_pixels, masks):
        assert np.array_equal(a, b) and (a < 0).sum() > 10000 and mask[a < 0].all()


@pytest.mark.slow
def test_the_experiment_decides_beam_centre_and_beam_stop(tmp_path):
    """Header beam centre wrong by 40 pixels, imported with the right centre
    and a beam-stop mask: the correction on read, the written CBF images and
    the on_read experiment list give the same pixels; the shells are centred
    on the given centre; masked pixels are neither fitted nor changed."""
    paths, _ = write_truncated_smv_sweep(
        tmp_path / "data", n_images=2, size=SIZE, seed=4, header_centre_shift=(40, 0)
    )
    geometry = smv_geometry(SIZE)
    centre = (
        geometry["BEAM_CENTER_Y"] / geometry["PIXEL_SIZE"],
        geometry["BEAM_CENTER_X"] / geometry["PIXEL_SIZE"],
    )
    override = "fast_slow_beam_centre=%.4f,%.4f" % centre
    run(["dials.import", *paths, "output.experiments=header.expt"], tmp_path)
    arm = (slice(int(centre[1]) - 6, int(centre[1]) + 6), slice(0, int(centre[0])))
    run(
        [
            "dials.generate_mask",
            "header.expt",
            "output.mask=beamstop.pickle",
            f"untrusted.rectangle=0,{int(centre[0])},{int(centre[1]) - 6},{int(centre[1]) + 6}",
        ],
        tmp_path,
    )
    common = [*paths, override, "mask=beamstop.pickle"]
    run(
        ["dials.import", *common, "output.experiments=on_read.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    run(["dials.import", *common, "output.experiments=stock.expt"], tmp_path)
    run(["dials.correct_truncation", "stock.expt", "output.report=None"], tmp_path)
    run(
        [
            "dials.correct_truncation",
            "stock.expt",
            "output.format=on_read",
            "output.experiments=fixed.expt",
            "output.json=fixed.json",
            "output.report=None",
            "output.log=fixed.log",
        ],
        tmp_path,
    )
    routes = {
        name: read_back(name, tmp_path)[1]
        for name in ("on_read.expt", "corrected.expt", "fixed.expt")
    }
    raw = [dxtbx.load(p).get_raw_data().as_numpy_array().ravel() for p in paths]
    for i in range(len(paths)):
        assert np.array_equal(routes["on_read.expt"][i], routes["corrected.expt"][i])
        assert np.array_equal(routes["fixed.expt"][i], routes["corrected.expt"][i])
        masked = np.zeros((SIZE, SIZE), bool)
        masked[arm] = True
        kept = raw[i].copy()
        if not stock_zeros_valid(dxtbx.load(paths[0]).get_detector()):
            kept[kept == 0] = (
                NOT_VALID  # zeros the stock class masks stay masked (current dxtbx)
            )
        assert masked.sum() > 1000 and np.array_equal(
            routes["corrected.expt"][i][masked.ravel()], kept[masked.ravel()]
        )
    record = json.loads((tmp_path / "dials.correct_truncation.json").read_text())
    n_valid = sum(s["n_valid"] for s in record["sequences"][0]["images"][0]["shells"])
    assert n_valid == SIZE * SIZE - masked.sum()
    shells = shell_map_for(
        ShellGeometry.from_record(record_of(tmp_path / "on_read.expt")["geometry"]),
        10,
        1000,
    )
    inner = np.argwhere(shells.labels.reshape(SIZE, SIZE) == 0)
    assert (
        np.abs(inner.mean(axis=0)[::-1] - centre).max() < 2.0
    )  # (fast, slow) of the innermost shell


@pytest.mark.slow
def test_stills_follow_the_experiment_list(tmp_path):
    """Stills (zero-width images; a single image file): dials.import cannot
    fix their geometry, so each program takes it from the experiment list it
    reads, overrides included: the same pixels as the written CBF images."""
    import mrcfile

    paths, _ = write_truncated_smv_sweep(
        tmp_path / "data", n_images=2, size=256, seed=6, osc_width=0.0
    )
    # a number in the name: current dials.import cannot import an MRC image without one
    with mrcfile.new(str(tmp_path / "single_001.mrc")) as mrc:
        mrc.set_data(
            dxtbx.load(paths[0]).get_raw_data().as_numpy_array().astype(np.uint16)
        )
    for name, files in (
        ("stills", paths),
        ("single", [str(tmp_path / "single_001.mrc")]),
    ):
        override = "fast_slow_beam_centre=140,120"
        run(
            [
                "dials.import",
                *files,
                override,
                f"output.experiments={name}_on_read.expt",
            ],
            tmp_path,
            DIALS_TRUNCFIX="1",
        )
        run(
            ["dials.import", *files, override, f"output.experiments={name}.expt"],
            tmp_path,
        )
        run(
            [
                "dials.correct_truncation",
                f"{name}.expt",
                "min_pixels_per_shell=100",
                f"output.directory={name}",
                f"output.experiments={name}_cbf.expt",
                f"output.json={name}.json",
                f"output.log={name}.log",
                "output.report=None",
            ],
            tmp_path,
        )
        _, on_read, masks = read_back(f"{name}_on_read.expt", tmp_path)
        _, written, _ = read_back(f"{name}_cbf.expt", tmp_path)
        for a, b, mask in zip(on_read, written, masks):
            assert np.array_equal(a, b) and (a < 0).sum() > 1000 and mask[a < 0].all()


# --- which cameras -----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("camera", ["pilatus", "timepix"])
def test_counting_detectors_are_read_as_stock(tmp_path, camera):
    """Their zeros are real counts: by default imported uncorrected, with the
    stock trusted range; truncfix.detector=integrating corrects them."""
    files = (write_pilatus_cbfs if camera == "pilatus" else write_timepix_smvs)(
        tmp_path
    )
    stock = format_wrapper.stock_format_class(files[0])
    assert ("Pilatus" if camera == "pilatus" else "TimePix") in stock.__name__
    run(["dials.import", *files, "output.experiments=plain.expt"], tmp_path)
    run(
        ["dials.import", *files, "output.experiments=default.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    plain, default = (
        read_back("plain.expt", tmp_path),
        read_back("default.expt", tmp_path),
    )
    assert default[0] == plain[0] and default[0]["format"] == stock.__name__
    assert all(np.array_equal(a, b) for a, b in zip(default[1], plain[1]))
    (tmp_path / "integrating.phil").write_text("truncfix.detector = integrating\n")
    run(
        ["dials.import", *files, "output.experiments=forced.expt"],
        tmp_path,
        DIALS_TRUNCFIX=str(tmp_path / "integrating.phil"),
    )
    forced = read_back("forced.expt", tmp_path)
    assert forced[0]["format"] == f"Truncfix_{stock.__name__}"
    assert min(p.min() for p in forced[1]) < 0


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["dm4", "ser"])
def test_electron_camera_formats_are_corrected(tmp_path, kind):
    """Gatan DM4 and TIA SER stacks (any integer format can be wrapped)."""
    from devtools.camera_files import write_dm4, write_ser

    path = str(tmp_path / f"stack_0001.{kind}")
    data = np.stack(
        [
            truncate(
                -4
                + np.exp(
                    1.6 + 0.5 * np.random.default_rng(k).standard_normal((256, 256))
                )
            )
            for k in range(3)
        ]
    )
    (write_dm4 if kind == "dm4" else write_ser)(path, data)
    expected = {"dm4": "FormatGatanDM4", "ser": "FormatSER"}[kind]
    assert stock_class_name(path).startswith(expected)
    import_on_read(
        [path],
        tmp_path,
        f"Truncfix_{stock_class_name(path)}",
        images=[(path, i) for i in range(3)],
    )


@pytest.mark.slow
def test_third_party_plugin_format_is_corrected(tmp_path):
    """A format class registered by another package's entry point."""
    env = install_plugin_camera(tmp_path, "FormatTestCamera", b"TESTCAM1", 256)
    paths = []
    for k in range(2):
        values = truncate(
            -4
            + np.exp(1.6 + 0.5 * np.random.default_rng(k).standard_normal((256, 256)))
        )
        paths.append(
            write_plugin_image(tmp_path / f"cam_{k + 1:05d}.tcm", b"TESTCAM1", values)
        )
    run(
        ["dials.import", *paths, "output.experiments=imported.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
        **env,
    )
    info, pixels, masks = read_back("imported.expt", tmp_path, **env)
    assert info["format"] == "Truncfix_FormatTestCamera"
    for data, mask in zip(pixels, masks):
        assert (data < 0).sum() > 1000 and mask[data < 0].all()


@pytest.mark.slow
def test_mrc_stack(tmp_path):
    import mrcfile

    path = str(tmp_path / "stack.mrc")
    with mrcfile.new(path) as mrc:
        mrc.set_data(
            np.stack(
                [
                    truncate(
                        -4
                        + np.exp(
                            1.6
                            + 0.5 * np.random.default_rng(k).standard_normal((256, 256))
                        )
                    )
                    for k in range(3)
                ]
            )
        )
    assert stock_class_name(path).startswith("FormatMRC")
    import_on_read(
        [path],
        tmp_path,
        f"Truncfix_{stock_class_name(path)}",
        images=[(path, i) for i in range(3)],
    )


@pytest.mark.slow
def test_full_cbf(smv_sweep, tmp_path):
    """Full CBF (byte offset, with goniometer and scan) holding truncated data."""
    from dials_truncfix.io.cbf import write_full_cbf

    imageset = ExperimentListFactory.from_filenames(smv_sweep)[0].imageset
    cbfs = []
    for k in range(len(imageset)):
        cbfs.append(str(tmp_path / f"full_{k + 1:05d}.cbf"))
        write_full_cbf(
            cbfs[-1],
            imageset,
            k,
            [imageset.get_raw_data(k)[0].as_numpy_array().astype(np.int32)],
            [(0, 65534)],
        )
    assert stock_class_name(cbfs[0]).startswith("FormatCBFFull")
    import_on_read(cbfs, tmp_path, f"Truncfix_{stock_class_name(cbfs[0])}")


@pytest.mark.slow
def test_more_specific_stock_class_is_the_one_wrapped(tmp_path):
    """An ADSC file with a serial number is read by the wrapper of that class."""
    paths, _ = write_truncated_smv_sweep(
        tmp_path / "sn", n_images=2, size=256, seed=3, DETECTOR_SN=4242
    )
    assert stock_class_name(paths[0]) == "FormatSMVADSCSN"
    import_on_read(paths, tmp_path, "Truncfix_FormatSMVADSCSN")


# --- records, settings, bad input ----------------------------------------------------


def _on_read_imageset(paths, settings):

    stock = format_wrapper.stock_format_class(paths[0])
    return format_wrapper.wrapped_class(stock.__name__).get_imageset(
        paths, as_sequence=True, format_kwargs={"truncfix": settings.to_record()}
    )


def test_signed_and_float_data_pass_through_with_one_notice(tmp_path, caplog):
    import mrcfile

    path = str(tmp_path / "signed.mrc")
    data = np.stack(
        [
            truncate(
                -4
                + np.exp(
                    1.6 + 0.5 * np.random.default_rng(k).standard_normal((128, 128))
                ),
                np.int16,
            )
            for k in range(3)
        ]
    )
    data[:, :10, :10] = -5  # real negatives: not truncated data
    with mrcfile.new(path) as mrc:
        mrc.set_data(data)
    iset = _on_read_imageset(
        [path], Settings(CorrectionParameters(min_pixels_per_shell=100))
    )
    with caplog.at_level("INFO"):
        for i in range(len(iset)):
            assert np.array_equal(
                iset.get_raw_data(i)[0].as_numpy_array(), data[i].astype(float)
            )
    assert caplog.text.count("passed through uncorrected") == 1


def test_pickled_reader_takes_the_geometry_along(smv_sweep):
    """DIALS sends imagesets to other processes by pickling them: the copy
    reads the same pixels without the experiment it came from."""
    iset = _on_read_imageset(smv_sweep, Settings(CorrectionParameters()))
    iset.set_beam(iset.get_beam())  # models as an experiment list sets them
    copy = pickle.loads(pickle.dumps(iset))
    for i in range(len(iset)):
        assert np.array_equal(
            copy.get_raw_data(i)[0].as_numpy_array(),
            iset.get_raw_data(i)[0].as_numpy_array(),
        )
        assert (iset.get_raw_data(i)[0].as_numpy_array() < 0).any()


def test_version_1_record_is_migrated_and_a_newer_one_refused(smv_sweep):
    old = {
        "n_shells": 10,
        "likelihood": "exact",
        "seed": 0,
        "histogram_max": None,
        "histogram_quantile": None,
        "min_pixels_per_shell": 1000,
        "mask": None,
    }
    settings = Settings.from_record(old)
    assert settings.parameters == CorrectionParameters() and settings.geometry is None
    from dxtbx.imageset import ImageSetFactory  # noqa: F401

    stock = format_wrapper.stock_format_class(smv_sweep[0])
    iset = format_wrapper.wrapped_class(stock.__name__).get_imageset(
        smv_sweep, as_sequence=True, format_kwargs={"truncfix": old}
    )
    expected, _ = header_correction(smv_sweep[0])
    assert np.array_equal(iset.get_raw_data(0)[0].as_numpy_array().ravel(), expected)
    from dials_truncfix.settings import TruncfixError

    with pytest.raises(TruncfixError, match="format version 3.*upgrade dials-truncfix"):
        Settings.from_record(
            {**Settings(CorrectionParameters()).to_record(), "version": 3}
        )


def test_a_record_of_the_earlier_algorithm_is_read_with_the_current_one_and_one_warning(
    smv_sweep, caplog
):
    """An experiment list written by dials-truncfix 0.2 (a version-2 record
    without ``algorithm``) reads the pixels of the current algorithm, and a
    user sees one warning per record however often it is read; a record of
    the current algorithm gives none."""
    from dials_truncfix import settings as settings_module

    current = Settings(CorrectionParameters(seed=11)).to_record()
    assert current["algorithm"] == settings_module.ALGORITHM
    earlier = {k: v for k, v in current.items() if k != "algorithm"}
    stock = format_wrapper.stock_format_class(smv_sweep[0])
    expected, _ = header_correction(smv_sweep[0], params=CorrectionParameters(seed=11))
    with caplog.at_level("WARNING"):
        for record in (
            current,
            current,
            earlier,
            earlier,
        ):  # two imagesets of each, all images read
            iset = format_wrapper.wrapped_class(stock.__name__).get_imageset(
                smv_sweep, as_sequence=True, format_kwargs={"truncfix": record}
            )
            for i in range(len(iset)):
                iset.get_raw_data(i)
            assert np.array_equal(
                iset.get_raw_data(0)[0].as_numpy_array().ravel(), expected
            )
    notes = [r for r in caplog.records if "re-import" in r.getMessage()]
    assert len(notes) == 1 and notes[0].levelname == "WARNING"
    assert (
        "algorithm 1" in notes[0].getMessage()
        and f"algorithm {settings_module.ALGORITHM}" in notes[0].getMessage()
    )


def test_corrupt_file_gives_the_normal_dxtbx_error(smv_sweep, tmp_path):
    bad = tmp_path / "trunc_00001.img"
    bad.write_bytes(open(smv_sweep[0], "rb").read().replace(b"SIZE1=384", b"SIZE1=3x4"))
    from dxtbx.format.FormatSMVADSC import FormatSMVADSC

    with pytest.raises(ValueError, match="could not convert string to float: '3x4'"):
        FormatSMVADSC(str(bad))
    with pytest.raises(ValueError, match="could not convert string to float: '3x4'"):
        format_wrapper.wrapped_class("FormatSMVADSC")(str(bad))


@pytest.mark.parametrize(
    "content, message",
    [
        (
            "truncfix.n_shells = 8\ntruncfix.nshells = 8\n",
            "unknown parameter(s): truncfix.nshells",
        ),
        (None, "no such PHIL file"),
    ],
)
def test_bad_phil_file_stops_dials_import_in_one_line(
    tmp_path, smv_sweep, content, message
):
    phil = tmp_path / "settings.phil"
    if content is not None:
        phil.write_text(content)
    result = run(
        ["dials.import", smv_sweep[0], "output.experiments=x.expt"],
        tmp_path,
        ok=False,
        DIALS_TRUNCFIX=str(phil),
    )
    assert f"DIALS_TRUNCFIX: {phil}: {message}" in one_line_error(result)
    assert not (tmp_path / "x.expt").exists()


@pytest.mark.parametrize("problem", ["missing", "garbage", "wrong shape"])
def test_bad_truncfix_mask_stops_dials_import_in_one_line(tmp_path, smv_sweep, problem):
    from scitbx.array_family import flex

    mask = tmp_path / "beamstop.pickle"
    if problem == "garbage":
        mask.write_bytes(b"not a mask")
    elif problem == "wrong shape":
        mask.write_bytes(pickle.dumps((flex.bool(flex.grid(10, 10), True),)))
    (tmp_path / "settings.phil").write_text(f"truncfix.mask = {mask}\n")
    result = run(
        ["dials.import", *smv_sweep, "output.experiments=x.expt"],
        tmp_path,
        ok=False,
        DIALS_TRUNCFIX=str(tmp_path / "settings.phil"),
    )
    output = one_line_error(result)
    assert f"truncfix.mask={mask}" in output
    assert not (tmp_path / "x.expt").exists()


@pytest.mark.slow
def test_phil_file_parameters_are_used_and_recorded(tmp_path, smv_sweep):
    (tmp_path / "settings.phil").write_text("truncfix { n_shells = 4\n seed = 9 }\n")
    run(
        ["dials.import", *smv_sweep],
        tmp_path,
        DIALS_TRUNCFIX=str(tmp_path / "settings.phil"),
    )
    record = record_of(tmp_path / "imported.expt")
    assert record["parameters"]["seed"] == 9 and record["parameters"]["n_shells"] == 4
    info, pixels, _ = read_back("imported.expt", tmp_path)
    expected, _ = header_correction(
        smv_sweep[0], params=CorrectionParameters(n_shells=4, seed=9)
    )
    assert np.array_equal(pixels[0], expected)


@pytest.mark.slow
def test_compressed_images(smv_sweep, tmp_path):
    """dxtbx reads gzip and bzip2 images: corrected on read like the plain
    files, and dials.correct_truncation names its outputs without the inner
    extension (trunc_00001.cbf, not trunc_00001.img.cbf)."""
    import bz2
    import gzip
    import shutil

    from dials_truncfix.io.cbf import write_full_cbf

    (tmp_path / "gz").mkdir()
    gz = []
    for path in smv_sweep:
        gz.append(str(tmp_path / "gz" / (os.path.basename(path) + ".gz")))
        with open(path, "rb") as src, gzip.open(gz[-1], "wb") as dst:
            shutil.copyfileobj(src, dst)
    import_on_read(gz, tmp_path, "Truncfix_FormatSMVADSC")
    imageset = ExperimentListFactory.from_filenames(smv_sweep)[0].imageset
    (tmp_path / "bz2").mkdir()
    cbfs = []
    for k in range(len(imageset)):
        plain = str(tmp_path / f"full_{k + 1:05d}.cbf")
        write_full_cbf(
            plain,
            imageset,
            k,
            [imageset.get_raw_data(k)[0].as_numpy_array().astype(np.int32)],
            [(0, 65534)],
        )
        cbfs.append(str(tmp_path / "bz2" / f"full_{k + 1:05d}.cbf.bz2"))
        with open(plain, "rb") as src, bz2.open(cbfs[-1], "wb") as dst:
            shutil.copyfileobj(src, dst)
    run(
        ["dials.import", *cbfs, "output.experiments=bz2.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    info, pixels, _ = read_back("bz2.expt", tmp_path)
    assert (
        info["format"] == f"Truncfix_{stock_class_name(cbfs[0])}"
        and min(p.min() for p in pixels) < 0
    )
    for files, name in ((gz, "trunc"), (cbfs, "full")):
        run(["dials.import", *files, f"output.experiments={name}.expt"], tmp_path)
        run(
            [
                "dials.correct_truncation",
                f"{name}.expt",
                f"output.directory={name}_out",
                "output.report=None",
                f"output.experiments={name}_out.expt",
                f"output.json={name}.json",
                f"output.log={name}.log",
            ],
            tmp_path,
        )
        assert sorted(os.listdir(tmp_path / f"{name}_out")) == [
            f"{name}_{k:05d}.cbf" for k in range(1, len(files) + 1)
        ]


def test_the_stock_choice_remembers_a_bounded_number_of_files(smv_sweep, monkeypatch):
    """dxtbx asks about each file several times as it imports it; a session
    that imports many files keeps only the last STOCK_CHOICES of them."""
    import dxtbx

    from dials_truncfix import format_wrapper

    monkeypatch.setattr(format_wrapper, "STOCK_CHOICES", 2)
    choice = format_wrapper.StockChoice()
    stock = type(dxtbx.load(smv_sweep[0]))
    assert [choice(p) for p in smv_sweep + smv_sweep[:1]] == [stock] * 4
    assert choice.remembered() == [smv_sweep[2], smv_sweep[0]]


# --- more dials.import routes ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_sweep(tmp_path_factory):
    directory = tmp_path_factory.mktemp("routes")
    paths, _ = write_truncated_smv_sweep(directory, n_images=3, size=256, seed=2)
    return paths


def _routed_import(workdir, args, expected_paths):
    """DIALS_TRUNCFIX=1 dials.import ``args``: a corrected sequence of
    ``expected_paths`` with its settings recorded, pixels as the core corrects
    each file with its header geometry (as an import of the files gives)."""
    run(
        ["dials.import", *args, "output.experiments=routed.expt"],
        workdir,
        DIALS_TRUNCFIX="1",
    )
    assert record_of(workdir / "routed.expt") is not None
    info, pixels, masks = read_back("routed.expt", workdir)
    assert info["format"] == "Truncfix_FormatSMVADSC" and info["n"] == len(
        expected_paths
    )
    for data, mask, path in zip(pixels, masks, expected_paths):
        expected, raw = header_correction(path)
        assert (
            np.array_equal(data, expected)
            and (data < 0).sum() > 1000
            and mask[data < 0].all()
        )
    return pixels


@pytest.mark.slow
def test_import_by_template(small_sweep, tmp_path):
    template = small_sweep[0].replace("00001.img", "#####.img")
    pixels = _routed_import(tmp_path, [f"template={template}"], small_sweep)
    run(
        ["dials.import", *small_sweep, "output.experiments=files.expt"],
        tmp_path,
        DIALS_TRUNCFIX="1",
    )
    _, by_files, _ = read_back("files.expt", tmp_path)
    assert all(np.array_equal(a, b) for a, b in zip(pixels, by_files))


@pytest.mark.slow
def test_import_with_an_image_range(small_sweep, tmp_path):
    _routed_import(
        tmp_path, [*small_sweep, "geometry.scan.image_range=2,3"], small_sweep[1:]
    )
    with open(tmp_path / "routed.expt") as fh:
        assert json.load(fh)["scan"][0]["image_range"] == [2, 3]


@pytest.mark.slow
def test_import_of_stills_converted_to_a_sequence(tmp_path):
    stills, _ = write_truncated_smv_sweep(
        tmp_path / "stills", n_images=2, size=256, seed=3, osc_width=0.0, prefix="still"
    )
    assert all(type(dxtbx.load(p)).__name__ == "FormatSMVADSC" for p in stills)
    _routed_import(
        tmp_path,
        [
            *stills,
            "convert_stills_to_sequences=True",
            "geometry.scan.oscillation=0,0.5",
        ],
        stills,
    )
    with open(tmp_path / "routed.expt") as fh:
        assert json.load(fh)["imageset"][0]["__id__"] == "ImageSequence"
