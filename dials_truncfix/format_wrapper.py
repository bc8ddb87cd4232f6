"""Correction on read: dxtbx format classes that return corrected pixels.

How it is switched on, and why it stays on
-------------------------------------------
* ``DIALS_TRUNCFIX=1`` (default parameters) or ``DIALS_TRUNCFIX=params.phil``
  makes the two dispatcher classes below claim plain image files during
  ``dials.import``.  With the variable unset they claim no plain file, so every
  file is read by exactly the stock class ("off means off").
* A dispatcher claims a file only when the stock registry's own choice for it
  (the most specific stock class) is an SMV, CBF or MRC class, and it wraps
  that very class: nothing is taken from a more specific stock class.
* The imagesets it builds name their images ``truncfix:///abs/path`` and carry
  the effective parameters in their format parameters, both of which the .expt
  records.  Any later process with the plugin installed re-opens such images
  through these classes, whatever the environment says, and so reads the
  same corrected pixels.  Without the plugin the URL cannot be read at all:
  the mismatch fails loudly instead of silently giving uncorrected data.

dxtbx turns a sequence template ``truncfix:///a/b_#####.img`` into the path
``<dir>/truncfix:/a/b_#####.img`` when it reads an .expt (it resolves
templates as paths); that form is recognised too.  Because stock classes raise
on paths that do not exist, the dispatchers are registered under names that
sort before every stock top-level class.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import threading

import dxtbx.format.FormatMultiImage as multi_image
from dxtbx.format.Format import Format
from dxtbx.format.FormatMultiImage import FormatMultiImage
from dxtbx.util import get_url_scheme

from dials_truncfix.core.assignment import LOWEST_VALUE
from dials_truncfix.core.correction import CORRECTED, NO_ZEROS
from dials_truncfix.corrector import ImageCorrector, image_identity
from dials_truncfix.settings import (
    ENVIRONMENT_VARIABLE,
    FORMAT_KWARG,
    Settings,
    TruncfixError,
    settings_from_environment,
)

logger = logging.getLogger(f"dials.{__name__}")

SCHEME = "truncfix"
#: trusted-range minimum of wrapped detectors: below anything the correction gives
TRUSTED_MINIMUM = LOWEST_VALUE - 1
#: stock format families that the wrappers handle
SUPPORTED_FAMILIES = ("FormatSMV", "FormatCBF", "FormatMRC")

_MANGLED = re.compile(r"^.*/" + SCHEME + r":(/.*)$")
_resolving = threading.local()


def is_truncfix_name(name):
    name = os.fspath(name)
    return get_url_scheme(name) == SCHEME or bool(_MANGLED.match(name))


def to_path(name):
    """The file behind a truncfix URL (or its mangled form); plain paths as given."""
    name = os.fspath(name)
    if get_url_scheme(name) == SCHEME:
        return name[len(SCHEME) + 3 :]
    match = _MANGLED.match(name)
    return match.group(1) if match else name


def to_url(name):
    return f"{SCHEME}://{os.path.abspath(to_path(name))}"


@functools.lru_cache(maxsize=None)
def _environment_record(value):
    settings = settings_from_environment({ENVIRONMENT_VARIABLE: value})
    return None if settings is None else settings.to_record()


def active_record():
    """The settings record DIALS_TRUNCFIX asks for, or None."""
    return _environment_record(os.environ.get(ENVIRONMENT_VARIABLE, ""))


# --- the stock class behind a file ----------------------------------------------


def stock_format_class(path):
    """The class stock dxtbx would choose for ``path`` (the dispatchers step aside)."""
    from dxtbx.format.Registry import get_format_class_for_file

    _resolving.active = True
    try:
        return get_format_class_for_file(path)
    finally:
        _resolving.active = False


def can_wrap(stock):
    """An SMV, CBF or MRC class that reads images (not a family root)."""
    if stock is None or stock.is_abstract() or stock.__name__ in SUPPORTED_FAMILIES:
        return False
    return any(
        base.__name__ in SUPPORTED_FAMILIES for base in stock.__mro__
    )


# --- wrapped classes ------------------------------------------------------------


class _URLReader(multi_image.Reader):
    """Multi-image reader whose file name, saved as the template, is the URL."""

    def __init__(self, format_class, filenames, num_images=None, **kwargs):
        super().__init__(format_class, [to_url(f) for f in filenames], num_images, **kwargs)

    def copy(self, filenames, num_images=None):
        return _URLReader(self.format_class, filenames, num_images, **self.kwargs)


class _CorrectOnRead:
    """Mixed in before a stock format class: corrected pixels, widened trusted
    range, truncfix URLs and recorded settings in the imagesets it makes."""

    _truncfix_wrapped = None

    def __init__(self, image_file, **kwargs):
        self._truncfix_name = os.fspath(image_file)
        record = kwargs.get(FORMAT_KWARG) or active_record()
        if record is None:
            raise TruncfixError(
                f"{image_file}: correction on read needs {ENVIRONMENT_VARIABLE} or recorded settings"
            )
        settings = Settings.from_record(record)
        self._truncfix_params, self._truncfix_mask_file = settings.parameters, settings.mask
        super().__init__(to_path(image_file), **kwargs)

    def get_image_file(self, *args):
        return self._truncfix_name

    def _detector(self):
        detector = super()._detector()
        for panel in detector:
            low, high = panel.get_trusted_range()
            panel.set_trusted_range((min(low, TRUSTED_MINIMUM), high))
        return detector

    def get_raw_data(self, *index):
        raw = super().get_raw_data(*index)
        key = image_identity(to_path(self._truncfix_name), index[0] if index else 0)
        corrected, result = self._corrector().correct(raw, key)
        if result.status not in (CORRECTED, NO_ZEROS):
            _notice_once(to_path(self._truncfix_name), result.status)
        return corrected if isinstance(raw, tuple) else corrected[0]

    def _corrector(self):
        """One corrector per geometry, mask and settings, shared by all the
        images of a sweep (each image is a new format instance)."""
        static = self.get_static_mask()
        key = (
            self._truncfix_params,
            self._truncfix_mask_file,
            str(self.get_detector().to_dict()),
            tuple(self.get_beam().get_s0()),
            None if static is None else tuple(m.as_numpy_array().tobytes() for m in static),
        )
        corrector = _correctors.get(key)
        if corrector is None:
            corrector = ImageCorrector(
                self.get_detector(),
                self.get_beam(),
                self._truncfix_params,
                masks=[static] if static is not None else [],
                mask_file=self._truncfix_mask_file,
            )
            _correctors.clear()  # one sweep geometry at a time is the common case
            _correctors[key] = corrector
        return corrector

    @classmethod
    def get_imageset(cls, input_filenames, *args, format_kwargs=None, template=None, **kwargs):
        format_kwargs = dict(format_kwargs or {})
        if FORMAT_KWARG not in format_kwargs:
            format_kwargs[FORMAT_KWARG] = active_record()
        if isinstance(input_filenames, (str, bytes, os.PathLike)):
            input_filenames = [input_filenames]
        filenames = [to_url(f) for f in input_filenames]
        if template is not None:
            template = to_url(template)
        return super().get_imageset(
            filenames, *args, format_kwargs=format_kwargs, template=template, **kwargs
        )


def is_corrected_on_read(format_class):
    """Whether imagesets of this format class are corrected on read."""
    return issubclass(format_class, _CorrectOnRead)


_noticed = set()
_correctors = {}


def _notice_once(path, status):
    if path not in _noticed:
        _noticed.add(path)
        logger.info("%s: passed through uncorrected (%s)", path, status)


@functools.lru_cache(maxsize=None)
def wrapped_class(stock_name):
    """The correcting subclass of a stock format class, made on demand and
    reachable by name from this module (so imagesets pickle)."""
    from dxtbx.format.Registry import get_format_class_for

    stock = get_format_class_for(stock_name)
    name = f"Truncfix_{stock_name}"
    namespace = {"__module__": __name__, "__qualname__": name, "_truncfix_wrapped": stock}
    if issubclass(stock, FormatMultiImage):
        namespace["get_reader"] = classmethod(lambda cls: functools.partial(_URLReader, cls))
    return type(name, (_CorrectOnRead, stock), namespace)


def __getattr__(name):
    if name.startswith("Truncfix_"):
        return wrapped_class(name[len("Truncfix_") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the registered dispatchers -------------------------------------------------


def _claim(name, multi):
    """The stock class to wrap if this dispatcher should take ``name``."""
    if getattr(_resolving, "active", False):
        return None
    name = os.fspath(name)
    if not is_truncfix_name(name):
        if get_url_scheme(name) or active_record() is None:
            return None
    stock = stock_format_class(to_path(name))
    if not can_wrap(stock) or issubclass(stock, FormatMultiImage) != multi:
        return None
    return stock


class _Dispatcher:
    _multi = False

    @classmethod
    def understand(cls, image_file):
        return _claim(image_file, cls._multi) is not None

    def __new__(cls, image_file, **kwargs):
        stock = _claim(image_file, cls._multi)
        if stock is None:
            raise TruncfixError(f"{image_file}: not a file the truncation correction can read")
        return wrapped_class(stock.__name__)(image_file, **kwargs)

    @classmethod
    def get_imageset(cls, input_filenames, *args, **kwargs):
        first = input_filenames if isinstance(input_filenames, str) else input_filenames[0]
        stock = _claim(first, cls._multi)
        return wrapped_class(stock.__name__).get_imageset(input_filenames, *args, **kwargs)


class FormatATruncfix(_Dispatcher, Format):
    """Single-image files (SMV, CBF, MRC images), corrected on read."""

    schemes = [SCHEME, ""]


class FormatATruncfixMultiImage(_Dispatcher, FormatMultiImage, Format):
    """Multi-image files (MRC stacks), corrected on read."""

    schemes = [SCHEME, ""]
    _multi = True


