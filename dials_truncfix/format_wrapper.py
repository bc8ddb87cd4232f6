"""Correction on read: dxtbx format classes and readers that give DIALS the
corrected pixels of an experiment's images.

The switch, and why it stays on
-------------------------------
* ``DIALS_TRUNCFIX`` (``1`` for the default parameters, or a PHIL file) is
  read only while dxtbx turns image files into imagesets, that is while
  ``ExperimentListFactory.from_filenames`` or ``from_templates`` (public
  dxtbx API, called by dials.import and by every DIALS program given image
  files) is on the call stack.  Decoding an experiment list goes through
  neither, so an experiment list reads as it was written.
* There the two dispatcher classes below claim every file stock dxtbx can
  read (single-image and multi-image files respectively, so they never both
  claim one).  dxtbx's FormatChecker hands the previous file's class to the
  next lookup as a hint and the registry tries that class's ancestors first:
  claiming only the files to be corrected would let a counting-detector file
  hide the dispatchers from the truncating files after it.  Files that stay
  uncorrected (a counting detector, see detectors.py; a class that builds its
  own imagesets; ``truncfix.detector=counting``) are handed back to their
  stock class, which builds the imageset, with one console line per imageset.
* A dispatcher wraps the very class stock dxtbx would choose for the file,
  so nothing is taken from a more specific stock class.  Any integer format
  can be wrapped (SMV, CBF, MRC, Gatan DM4, SER, third-party plugin classes);
  classes that build their own imagesets (NeXus/HDF5) cannot.
* The imagesets it builds name their images ``truncfix:///abs/path`` and carry
  the settings record (settings.py) in their format parameters; dxtbx writes
  both into the .expt.  Any later process with the plugin installed reads such
  images through these classes, whatever its environment says.  Without the
  plugin the URL cannot be read at all: the mismatch fails loudly instead of
  silently giving uncorrected data.
* The readers hand the URLs out only while dxtbx writes the imageset into
  such a record (``ExperimentList.to_dict`` and the legacy serialisers,
  compat.imageset_serialiser_code, found on the call stack); everyone else
  asking for the files (``get_path``, ``paths``, ``master_path``) gets the
  image files, which programs such as xia2 check and open.  A sequence's
  template is kept and written by dxtbx's C++ imageset: it stays a URL.

The experiment decides, once
----------------------------
The shells come from the experiment, not from the file header: its beam and
detector models (import-time overrides such as ``fast_slow_beam_centre`` and
``distance`` included) and every mask it carries (geometry.py says which).
They are fixed in the settings record when the experiment list is written
by ``dials.import`` (or ``dials.correct_truncation output.format=on_read``),
so that refinement later changes no pixel: spot finding and integration
read identical data.

How: dxtbx keeps an imageset's format parameters pickled and unpickles them
whenever it hands them out, also when dials.import writes the experiment
list after applying overrides and masks.  The record made at import is a
:class:`RecordAtImport`, whose unpickling completes it with the shell
geometry of its imageset as it is at that moment.  Stills escape this:
dials.import gives each still experiment a copy of the imageset and applies
overrides to the copies, which the record cannot see; their geometry is left
to the experiment list (below).  An imageset imported in another process
(xia2 imports in forked workers and writes the experiment lists in its own
process) comes pickled: its reader takes the record's geometry along and
completes the record there (by the record's token, ``geometry_at_import``).

The pixels are corrected by the imageset's reader, not by the format class,
because only the imageset knows the experiment.  A record without a geometry
(dials-truncfix 0.1, or an imageset not yet written) takes it from the
imageset the reader was made for, at the first read of each image, and
carries it along when DIALS pickles the imageset for other processes.  A
format instance on its own (``dxtbx.load``) has no experiment and reads
uncorrected data.

dxtbx turns a sequence template ``truncfix:///a/b_#####.img`` into a path
when it reads an .expt; that form is recognised too (compat.unmangled_path).
Because stock classes raise
on paths that do not exist, the dispatchers are registered under names that
sort before every stock top-level class.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import logging
import os
import sys
import threading
import uuid
import weakref

import dxtbx.format.Format as single_image
import dxtbx.format.FormatMultiImage as multi_image
from dxtbx.format.Format import Format
from dxtbx.format.FormatMultiImage import FormatMultiImage
from dxtbx.imageset import ImageSequence
from dxtbx.util import get_url_scheme

from dials_truncfix.compat import (
    imageset_serialiser_code,
    unmangled_path,
    valid_integer_range,
)
from dials_truncfix.core.correction import CORRECTED, NO_ZEROS, say_once
from dials_truncfix.corrector import (
    corrector_for,
    describe_corrected,
    image_identity,
    stock_zeros_valid,
)
from dials_truncfix.detectors import correction_refused, describe_as_integrating
from dials_truncfix.geometry import (
    MaskFileError,
    experiment_shell_geometry,
    shell_geometry,
    user_mask,
)
from dials_truncfix.settings import (
    ENVIRONMENT_VARIABLE,
    FORMAT_KWARG,
    Settings,
    TruncfixError,
    settings_from_environment,
    variable_set,
)

logger = logging.getLogger(f"dials.{__name__}")

SCHEME = "truncfix"
#: a stock trusted range admitting values below this is one of signed data;
#: -1 itself is valid under dxtbx >= 3.12 in the ranges (-1, max) that older
#: dxtbx used to admit 0 (strict inequalities), so it does not count
SIGNED_DATA_BELOW = -1

_resolving = threading.local()


def is_truncfix_name(name):
    name = os.fspath(name)
    return get_url_scheme(name) == SCHEME or unmangled_path(name, SCHEME) is not None


def to_path(name):
    """The file behind a truncfix URL (or its mangled form); plain paths as given."""
    name = os.fspath(name)
    if get_url_scheme(name) == SCHEME:
        return name[len(SCHEME) + 3 :]
    path = unmangled_path(name, SCHEME)
    return name if path is None else path


def to_url(name):
    return f"{SCHEME}://{os.path.abspath(to_path(name))}"


@functools.lru_cache(maxsize=None)
def _environment_settings(value):
    return settings_from_environment({ENVIRONMENT_VARIABLE: value})


def environment_settings() -> Settings | None:
    """The settings DIALS_TRUNCFIX asks for, or None (parsed once per value)."""
    return _environment_settings(os.environ.get(ENVIRONMENT_VARIABLE, ""))


@functools.lru_cache(maxsize=None)
def _image_import_code():
    from dxtbx.model.experiment_list import ExperimentListFactory

    return frozenset(
        f.__code__
        for f in (
            ExperimentListFactory.from_filenames,
            ExperimentListFactory.from_templates,
        )
    )


def _running(codes) -> bool:
    """Whether a function of one of these code objects is on the call stack."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code in codes:
            return True
        frame = frame.f_back
    return False


def images_becoming_imagesets() -> bool:
    """Whether dxtbx is now turning image files into imagesets
    (``ExperimentListFactory.from_filenames`` or ``from_templates`` is
    running), as opposed to decoding an experiment list."""
    return _running(_image_import_code())


def imageset_being_recorded() -> bool:
    """Whether dxtbx is now writing an imageset's file names into a record
    that will be read back (``ExperimentList.to_dict``, which every .expt
    goes through; compat.imageset_serialiser_code lists them all)."""
    return _running(imageset_serialiser_code())


# --- the stock class behind a file ----------------------------------------------


def stock_format_class(path, format_hint=None):
    """The class stock dxtbx would choose for ``path`` (the dispatchers step aside)."""
    from dxtbx.format.Registry import get_format_class_for_file

    with resolving_stock_class():
        return get_format_class_for_file(path, format_hint=format_hint)


@contextlib.contextmanager
def resolving_stock_class():
    """While stock dxtbx chooses a class the dispatchers claim nothing (in
    this thread); nested uses restore the state they found."""
    previous = getattr(_resolving, "active", False)
    _resolving.active = True
    try:
        yield
    finally:
        _resolving.active = previous


def stock_class_being_resolved() -> bool:
    """Whether this thread is inside :func:`resolving_stock_class`."""
    return getattr(_resolving, "active", False)


def can_wrap(stock):
    """A concrete class that builds its imagesets with dxtbx's standard
    readers (which the correction on read replaces)."""
    if stock is None or stock.is_abstract():
        return False
    base = FormatMultiImage if issubclass(stock, FormatMultiImage) else Format
    return stock.get_imageset.__func__ is base.get_imageset.__func__ and (
        stock.get_reader.__func__ is base.get_reader.__func__
    )


def is_corrected_on_read(format_class):
    """Whether imagesets of this format class are corrected on read."""
    return issubclass(format_class, _CorrectOnRead)


# --- readers: where the pixels are corrected --------------------------------------


class _CorrectingReader:
    """Mixed in before a dxtbx reader: reads the stock pixels and corrects them
    with the shell geometry of the experiment (see the module docstring)."""

    def _start(self, kwargs):
        record = kwargs.get(FORMAT_KWARG)
        if record is None:
            raise TruncfixError(
                f"{self.paths()[0]}: correction on read needs recorded settings"
            )
        self._settings = Settings.from_record(record)
        self._token = None  # of the record made at import (RecordAtImport), if any
        self._followed = None
        self._geometries = {}
        self._zeros_valid = None

    def follow(self, imageset):
        """Take the shell geometry from this imageset (weakly referenced)."""
        self._followed = weakref.ref(imageset)

    def followed(self):
        return self._followed() if self._followed else None

    def _carry_over(self, copy):
        copy._followed, copy._geometries, copy._token = (
            self._followed,
            self._geometries,
            self._token,
        )
        return copy

    @staticmethod
    def _names(urls):
        """The names this reader hands out (``paths()``, and through it the
        imageset's ``get_path`` and ``paths``): the truncfix URLs while dxtbx
        records the imageset (they mark it in the experiment list), the image
        files themselves to everyone else, who may open them."""
        return list(urls) if imageset_being_recorded() else [to_path(u) for u in urls]

    def _format_instance(self, index):
        raise NotImplementedError

    def read(self, index):
        raw = super().read(index)
        path, in_file = self._image(index)
        corrected, result = corrector_for(
            self._geometry(index), self._settings.parameters
        ).correct(
            raw if isinstance(raw, tuple) else (raw,),
            image_identity(path, in_file),
            self._stock_zeros_valid(index),
        )
        if result.status not in (CORRECTED, NO_ZEROS):
            say_once(
                (path, "passed through"),
                logging.INFO,
                "%s: passed through uncorrected (%s)",
                path,
                result.status,
            )
        elif result.damaged:
            say_once(
                (path, "damaged"),
                logging.INFO,
                "%s: %s are all zero (a file cut short?): left as they were",
                path,
                result.damaged,
            )
        return corrected if isinstance(raw, tuple) else corrected[0]

    def _stock_zeros_valid(self, index):
        """Whether the stock class counts zero pixels as valid (zeros left
        alone as not truncation must stay as valid or masked as stock)."""
        if self._zeros_valid is None:
            self._zeros_valid = stock_zeros_valid(
                self._format_instance(index).stock_detector()
            )
        return self._zeros_valid

    def _geometry(self, index):
        if self._settings.geometry is not None:
            return self._settings.geometry
        geometry = self._geometries.get(index)
        if geometry is None:
            geometry = self._geometries[index] = self._resolve(index)
        return geometry

    def geometry_now(self, imageset, index):
        """The shell geometry image ``index`` has in ``imageset`` now."""
        position = (
            0
            if isinstance(imageset, ImageSequence)
            else list(imageset.indices()).index(index)
        )
        return experiment_shell_geometry(
            imageset, position, self._format_instance(index), self._settings.mask
        )

    def _resolve(self, index):
        """The shell geometry of image ``index`` from the followed imageset,
        else (a reader without an experiment) from the file header."""
        imageset = self.followed()
        try:
            if imageset is not None:
                geometry = self.geometry_now(imageset, index)
                if isinstance(imageset, ImageSequence):
                    self._geometries.update(dict.fromkeys(imageset.indices(), geometry))
                return geometry
            instance = self._format_instance(index)
            beam, detector = self._header_models(instance, index)
            return shell_geometry(
                beam,
                detector,
                [instance.get_static_mask(), user_mask(self._settings.mask, detector)],
            )
        except MaskFileError as e:
            raise TruncfixError(str(e)) from None

    def __getstate__(self):
        """Pickled for another process: take the geometry of every image of
        the followed imageset along, since that process has no experiment."""
        imageset = self.followed()
        if imageset is not None and self._settings.geometry is None:
            for index in imageset.indices():
                self._geometry(index)
        state = dict(self.__dict__)
        state["_followed"] = None
        if (
            self._token is not None
        ):  # the record's geometry, for an experiment list written there
            state["_geometry_at_import"] = geometry_at_import(self._token)
        return state

    def __setstate__(self, state):
        state = dict(state)
        geometry = state.pop("_geometry_at_import", None)
        self._token = None
        self.__dict__.update(state)
        if self._token is not None and geometry is not None:
            _fixed_at_import.setdefault(self._token, geometry)


class CorrectingReader(_CorrectingReader, single_image.Reader):
    def __init__(self, format_class, filenames, **kwargs):
        super().__init__(format_class, [to_url(f) for f in filenames], **kwargs)
        self._start(kwargs)

    def copy(self, filenames):
        return self._carry_over(
            CorrectingReader(self.format_class, filenames, **self._kwargs)
        )

    def paths(self):
        return self._names(self._filenames)

    def _image(self, index):
        return to_path(self._filenames[index]), 0

    def _format_instance(self, index):
        return self.format_class.get_instance(self._filenames[index], **self._kwargs)

    @staticmethod
    def _header_models(instance, index):
        return instance.get_beam(), instance.get_detector()


class CorrectingMultiImageReader(_CorrectingReader, multi_image.Reader):
    def __init__(self, format_class, filenames, num_images=None, **kwargs):
        super().__init__(
            format_class, [to_url(f) for f in filenames], num_images, **kwargs
        )
        self._start(kwargs)

    def copy(self, filenames, num_images=None):
        return self._carry_over(
            CorrectingMultiImageReader(
                self.format_class, filenames, num_images, **self.kwargs
            )
        )

    def paths(self):
        return self._names([self._filename])

    def master_path(self):
        return self._names([self._filename])[0]

    def _image(self, index):
        return to_path(self._filename), index

    def _format_instance(self, index):
        return self.format_class.get_instance(self._filename, **self.kwargs)

    @staticmethod
    def _header_models(instance, index):
        return instance.get_beam(index), instance.get_detector(index)


# --- the record made at import ------------------------------------------------------

#: readers of the imagesets being imported, by the token of their record
_importing: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
#: shell geometries (records) of imagesets imported in another process that
#: sent them here pickled, by the token of their record
_fixed_at_import: dict = {}


class RecordAtImport(dict):
    """A settings record that, when dxtbx unpickles it, comes back as a plain
    record holding the shell geometry its imageset has at that moment."""

    def __init__(self, record, token):
        super().__init__(record)
        self.token = token

    def __reduce__(self):
        return (complete_record, (dict(self), self.token))


def complete_record(record, token):
    """The record with the shell geometry of the imageset being imported,
    if it is (still) known and all its images share one; else as it is."""
    if record.get("geometry") is not None:
        return record
    geometry = geometry_at_import(token)
    return record if geometry is None else {**record, "geometry": geometry}


def geometry_at_import(token):
    """The shell geometry (as recorded) that the imageset imported under
    ``token`` has now, if all its images share one: from the imageset itself
    in the process that imported it, else as that process sent it along
    with the pickled imageset (xia2 imports in worker processes); None if
    unknown."""
    reader = _importing.get(token)
    imageset = reader.followed() if reader is not None else None
    if imageset is None:
        return _fixed_at_import.get(token)
    try:
        geometries = {
            g.digest: g
            for g in (reader.geometry_now(imageset, i) for i in imageset.indices())
        }
    except Exception as e:  # noqa: BLE001 - never break dxtbx's unpickling
        logger.warning(
            "%s: the shell geometry could not be fixed at import (%s)",
            reader.paths()[0],
            e,
        )
        return None
    return next(iter(geometries.values())).to_record() if len(geometries) == 1 else None


# --- wrapped classes ------------------------------------------------------------


class _CorrectOnRead:
    """Mixed in before a stock format class: truncfix URLs, trusted ranges
    that admit the corrected values, the correcting reader, and the settings
    record in the imagesets it makes."""

    _truncfix_wrapped = None

    def __init__(self, image_file, **kwargs):
        self._truncfix_name = os.fspath(image_file)
        super().__init__(to_path(image_file), **kwargs)

    def get_image_file(self, *args):
        return self._truncfix_name

    def _detector(self):
        """The stock trusted ranges, widened to admit the corrected values
        unless they admit values below SIGNED_DATA_BELOW (a class that does,
        such as a dark-subtracted XFEL camera's, may hold signed data, which
        the correction passes through: its mask stays stock); "PAD" panels
        described as an integrating camera's in either case
        (detectors.describe_as_integrating)."""
        detector = super()._detector()
        if detector is None:
            return None
        if all(
            valid_integer_range(panel.get_trusted_range())[0] >= SIGNED_DATA_BELOW
            for panel in detector
        ):
            describe_corrected(detector)
        else:
            describe_as_integrating(detector)
        return detector

    def stock_detector(self):
        """The detector model, trusted ranges included, of the stock class."""
        return super()._detector()

    @classmethod
    def get_reader(cls):
        reader = (
            CorrectingMultiImageReader
            if issubclass(cls, FormatMultiImage)
            else CorrectingReader
        )
        return functools.partial(reader, cls)

    @classmethod
    def get_imageset(
        cls, input_filenames, *args, format_kwargs=None, template=None, **kwargs
    ):
        format_kwargs = dict(format_kwargs or {})
        if isinstance(input_filenames, (str, bytes, os.PathLike)):
            input_filenames = [input_filenames]
        filenames = [to_url(f) for f in input_filenames]
        token = None
        if (
            FORMAT_KWARG not in format_kwargs
        ):  # images imported now: settings from the environment
            settings = environment_settings()
            if settings is None:
                raise TruncfixError(
                    f"{to_path(filenames[0])}: correction on read needs recorded settings"
                )
            _check_user_mask(settings, filenames[0])
            token = uuid.uuid4().hex
            format_kwargs[FORMAT_KWARG] = RecordAtImport(settings.to_record(), token)
        if template is not None:
            template = to_url(template)
        imageset = super().get_imageset(
            filenames, *args, format_kwargs=format_kwargs, template=template, **kwargs
        )
        imageset.reader().follow(imageset)
        if token is not None:
            imageset.reader()._token = token
            _importing[token] = imageset.reader()
        return imageset


def _check_user_mask(settings, url):
    """A truncfix.mask that cannot be used stops the import (one line)."""
    if settings.mask:
        detector = stock_format_class(to_path(url))(to_path(url)).get_detector()
        try:
            user_mask(settings.mask, detector)
        except MaskFileError as e:
            raise TruncfixError(f"{ENVIRONMENT_VARIABLE}: truncfix.mask={e}") from None


@functools.lru_cache(maxsize=None)
def wrapped_class(stock_name):
    """The correcting subclass of a stock format class, made on demand and
    reachable by name from this module (so imagesets pickle)."""
    from dxtbx.format.Registry import get_format_class_for

    stock = get_format_class_for(stock_name)
    name = f"Truncfix_{stock_name}"
    namespace = {
        "__module__": __name__,
        "__qualname__": name,
        "_truncfix_wrapped": stock,
    }
    return type(name, (_CorrectOnRead, stock), namespace)


def __getattr__(name):
    if name.startswith("Truncfix_"):
        return wrapped_class(name[len("Truncfix_") :])
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# --- the registered dispatchers -------------------------------------------------


class StockChoice:
    """What stock dxtbx reads a file with, resolved once per file (dxtbx asks
    several times about each file as it imports it; the last STOCK_CHOICES
    files are remembered): the previous file's class is the hint, as dxtbx's
    own FormatChecker does, so the choice is exactly the one stock dxtbx
    makes in the same sequence."""

    def __init__(self):
        self._by_file = collections.OrderedDict()
        self._previous = None

    def __call__(self, path):
        try:
            key = (path, os.stat(path).st_mtime_ns)
        except OSError:
            return None
        if key in self._by_file:
            self._by_file.move_to_end(key)
            return self._by_file[key]
        stock = stock_format_class(path, self._previous)
        self._by_file[key] = stock
        if len(self._by_file) > STOCK_CHOICES:
            self._by_file.popitem(last=False)
        self._previous = stock.__name__ if stock is not None else None
        return stock

    def remembered(self) -> list:
        """The files whose choice is remembered, least recently used first."""
        return [path for path, _ in self._by_file]


#: files whose stock class is remembered
STOCK_CHOICES = 1024

_stock_choice = StockChoice()


def uncorrected_because(stock, settings, path) -> str | None:
    """Why the images of file ``path``, of this stock class, stay as stock
    reads them, or None."""
    return correction_refused(
        stock, settings.detector, lambda: stock_panel_types(stock, path)
    ) or (None if can_wrap(stock) else f"{stock.__name__} builds its own imagesets")


@functools.lru_cache(maxsize=64)
def _panel_types(stock, path, mtime_ns):
    instance = stock(path)
    detector = (
        instance.get_detector(0)
        if issubclass(stock, FormatMultiImage)
        else instance.get_detector()
    )
    return tuple(panel.get_type() for panel in detector or ())


def stock_panel_types(stock, path) -> tuple[str, ...]:
    """The dxtbx types of the panels stock dxtbx gives the file (its first
    image); read once per file version."""
    return _panel_types(stock, path, os.stat(path).st_mtime_ns)


def _claim(name, multi):
    """(stock class, why it stays uncorrected or None) if this dispatcher
    reads ``name``: a truncfix URL, or, with DIALS_TRUNCFIX set, any image
    file that is becoming an imageset (see the module docstring)."""
    if stock_class_being_resolved():
        return None
    name = os.fspath(name)
    if is_truncfix_name(name):
        stock, why = stock_format_class(to_path(name)), None
        if stock is None or not can_wrap(stock):
            return None
    elif get_url_scheme(name):
        return None
    else:
        if not variable_set() or not images_becoming_imagesets():
            return None
        stock = _stock_choice(
            name
        )  # None for files that are not images (an .expt DIALS tries first)
        if stock is None or stock.is_abstract():
            return None
        why = uncorrected_because(stock, environment_settings(), name)
    if issubclass(stock, FormatMultiImage) != multi:
        return None
    return stock, why


def _description(names, template):
    if template is not None:
        return (
            f"{template} ({len(names)} images)" if len(names) > 1 else to_path(names[0])
        )
    return to_path(names[0]) + (f" and {len(names) - 1} more" if len(names) > 1 else "")


class _Dispatcher:
    """Reads what it claims through the wrapped class of the file's stock
    class, or through the stock class itself where the images stay
    uncorrected (the imageset, and the experiment list, are then stock)."""

    _multi = False

    @classmethod
    def understand(cls, image_file):
        return _claim(image_file, cls._multi) is not None

    def __new__(cls, image_file, **kwargs):
        claim = _claim(image_file, cls._multi)
        if claim is None:
            raise TruncfixError(
                f"{image_file}: not a file the truncation correction can read"
            )
        stock, why = claim
        if why:
            return stock(image_file, **kwargs)
        return wrapped_class(stock.__name__)(image_file, **kwargs)

    @classmethod
    def get_imageset(cls, input_filenames, *args, **kwargs):
        names = (
            [input_filenames]
            if isinstance(input_filenames, (str, bytes, os.PathLike))
            else list(input_filenames)
        )
        claims = {_claim(name, cls._multi) for name in names}
        if None in claims:
            raise TruncfixError(
                f"{names[0]}: not a file the truncation correction can read"
            )
        if len(claims) > 1:
            classes = ", ".join(sorted({stock.__name__ for stock, _ in claims}))
            raise TruncfixError(
                f"{_description(names, None)}: images of different formats ({classes}) in one imageset: "
                "import them separately"
            )
        stock, why = claims.pop()
        if why:
            logger.warning(
                "%s: %s read uncorrected: %s",
                ENVIRONMENT_VARIABLE,
                _description(names, kwargs.get("template")),
                why,
            )
            return stock.get_imageset(input_filenames, *args, **kwargs)
        return wrapped_class(stock.__name__).get_imageset(
            input_filenames, *args, **kwargs
        )


class FormatATruncfix(_Dispatcher, Format):
    """Single-image files, corrected on read."""

    schemes = [SCHEME, ""]


class FormatATruncfixMultiImage(_Dispatcher, FormatMultiImage, Format):
    """Multi-image files (MRC stacks, DM4, SER), corrected on read."""

    schemes = [SCHEME, ""]
    _multi = True
