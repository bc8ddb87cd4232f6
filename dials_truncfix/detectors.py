"""Which detectors truncate, and how DIALS is told what the corrected data are.

Integrating cameras truncate: the dark-subtracted, gain-corrected signal of a
CCD or a scintillator-coupled CMOS camera is stored as unsigned integers.
Photon/electron-counting hybrid pixel detectors do not: their zeros are real
counts, and the zero-inflated Poisson of a weak background looks much like a
truncated one.  So the decision is made by what the detector is, never by the
pixels.  The rule, in one place (``truncfix.detector=auto``):

1. The file's dxtbx format class and its bases, most specific first, are
   looked up in :data:`COUNTING_CLASSES` and :data:`INTEGRATING_CLASSES`; the
   first class found decides.  The counting list names every counting
   detector of both supported dxtbx versions (Pilatus, Eiger, SINGLA,
   TimePix, Lambda, ADSC HF-4M, Rigaku HyPix; neutron time-of-flight
   detectors), whatever the file format (CBF, SMV, NeXus/HDF5, ROD).  The
   integrating list names the cameras that dxtbx labels "PAD" although they
   integrate (Gatan DM4, MRC, TIA SER, Ceta-D SMV; charge-integrating pixel
   detectors, whose signed data the correction passes through).
2. A class in neither list (a generic class such as FormatCBFMini, a
   third-party plugin) is decided by the file's detector model: panels of a
   dxtbx type containing "PAD" are taken for a counting detector and left
   uncorrected, any other type (CCD, image plate, unknown) for an
   integrating camera.

``truncfix.detector=integrating`` corrects whatever the class, ``counting``
nothing.

DIALS chooses its default background model by the same label: ``auto`` picks
the robust Poisson GLM when every panel is of a "PAD" type with gain 1, and
the GLM rejects negative pixels.  The corrected data of an integrating camera
have negative pixels by design, so the detector of a corrected imageset is
described as the integrating camera it is (:func:`describe_as_integrating`):
"PAD" panel types become :data:`INTEGRATING_TYPE`, and DIALS' defaults then
use its ``simple`` background model, as for any CCD.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

#: dxtbx format classes (and their subclasses) of counting detectors
COUNTING_CLASSES = frozenset(
    {
        # DECTRIS Pilatus
        "FormatCBFMiniPilatus",
        "FormatCBFFullPilatus",
        "FormatSMVRigakuPilatus",
        # DECTRIS Eiger, Eiger2 (QUADRO), SINGLA (NXmx ED)
        "FormatCBFMiniEiger",
        "FormatCBFMiniEigerPhotonFactory",
        "FormatSMVRigakuEiger",
        "FormatHDF5EigerNearlyNexus",
        "FormatNXmxEigerFilewriter",
        "FormatNXmxDLS",
        "FormatNXmxED",
        # TimePix / Medipix
        "FormatSMVTimePix_SU",
        "FormatNexusTimepix2M",
        # X-Spectrum Lambda
        "FormatHDF5Lambda",
        # ADSC HF-4M
        "FormatCBFMiniADSCHF4M",
        # Rigaku HyPix (Oxford Diffraction ROD, as on the Synergy-ED)
        "FormatROD",
        # neutron time-of-flight detectors (ISIS SXD, SNS MaNDi, ESS NMX)
        "FormatISISSXD",
        "FormatMANDI",
        "FormatESSNMX",
        "FormatESSNMX_McStas",
    }
)

#: dxtbx format classes (and their subclasses) of integrating detectors that
#: dxtbx labels "PAD"
INTEGRATING_CLASSES = frozenset(
    {
        # scintillator-coupled CMOS cameras of electron diffraction
        "FormatGatanDM4",
        "FormatMRC",
        "FormatSER",
        "FormatSMVADSCCetaD",
        # charge-integrating pixel detectors (CSPAD, JUNGFRAU, ePix, MPCCD):
        # signed, dark-subtracted data, which the correction passes through
        "FormatCBFCspad",
        "FormatXTCCspad",
        "FormatPYunspecified",
        "FormatPYmultitile",
        "FormatNexusJungfrauHack",
        "FormatNexusJungfrauExt",
        "FormatHDF5ESRFJungfrau4M",
        "FormatXTCJungfrau",
        "FormatXTCEpix",
        "FormatHDF5SaclaMPCCD",
    }
)

#: the dxtbx panel type of a corrected imageset's "PAD" panels
INTEGRATING_TYPE = "SENSOR_CCD"

COUNTING = "counting"
INTEGRATING = "integrating"


def class_decision(format_class: type) -> str | None:
    """COUNTING or INTEGRATING where the format class (or its nearest listed
    base) decides, None where the file's detector model must."""
    for cls in format_class.__mro__:
        if cls.__name__ in COUNTING_CLASSES:
            return COUNTING
        if cls.__name__ in INTEGRATING_CLASSES:
            return INTEGRATING
    return None


def pad_panels(panel_types: Iterable[str]) -> bool:
    """Whether DIALS would take these panels for a pixel array detector."""
    return any("PAD" in t for t in panel_types)


def correction_refused(
    format_class: type,
    detector_choice: str,
    panel_types: Callable[[], Iterable[str]] | None = None,
) -> str | None:
    """Why images of this format class are not corrected under the user's
    ``truncfix.detector`` choice, or None if they are.  ``panel_types`` gives
    the dxtbx types of the file's panels, asked for only where the class does
    not decide."""
    name = format_class.__name__
    if detector_choice == "counting":
        return "truncfix.detector=counting"
    if detector_choice != "auto":
        return None
    decision = class_decision(format_class)
    if decision == COUNTING:
        return (
            f"{name} is a counting detector (truncfix.detector=integrating corrects it)"
        )
    if decision is None and panel_types is not None:
        types = sorted(set(panel_types()))
        if pad_panels(types):
            return (
                f"{name} describes a pixel array detector ({', '.join(types)}), taken for a "
                "counting detector (truncfix.detector=integrating corrects it)"
            )
    return None


def describe_as_integrating(detector) -> bool:
    """Give the "PAD" panels of a corrected detector model (in place) the type
    of an integrating camera, so that DIALS' default background model accepts
    negative pixels (see the module docstring); True if any changed."""
    changed = False
    for panel in detector:
        if "PAD" in panel.get_type():
            panel.set_type(INTEGRATING_TYPE)
            changed = True
    return changed
