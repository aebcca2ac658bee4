"""Turn ultrasound files (DICOM or ordinary images) into single-channel uint8 frames.

The ingest tool feeds every file it finds through :func:`read_image_file`. A file either becomes
an :class:`ImageFile` (gray uint8 frames, cropped to the scan region when asked, plus the few
identifiers the caller hashes) or raises :class:`UnreadableError` whose message says why it was
skipped. No bad file crashes the caller and none gives a silently wrong image: anything the code
cannot interpret with certainty (an unknown colour space, a codec pydicom lacks, pixel data cut
short) is an error, not a guess.

File type is detected by content: a 128-byte preamble followed by ``DICM`` is DICOM; a file
named ``.dcm`` / ``.dicom`` / ``.dic`` / ``.ima`` (or without extension) that pydicom parses
with ``force`` and that carries pixel data or a SOP Class UID is DICOM too (old files without
preamble); everything else goes to PIL.

Colour handling (one convention for every source, so a DICOM frame and the same frame exported
as PNG give the same gray values):

* RGB -> ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``. For 8-bit data the fixed-point form
  PIL's ``convert("L")`` uses (``(19595 R + 38470 G + 7471 B + 2**15) >> 16``) so the two agree
  bit for bit.
* YBR_FULL / YBR_FULL_422 / YBR_ICT: the Y channel *is* that luma, so it is taken as is. DICOM
  pixels are therefore decoded with ``raw=True`` (pydicom's default ``pixel_array`` converts
  YBR_FULL(_422) to RGB, which costs a rounding and clips saturated colours: the luma of that
  RGB differs from Y by up to ~7 levels on colour-Doppler pixels) and the photometric
  interpretation the *decoder* reports is used, not the one in the header: JPEG 2000 files
  labelled YBR_RCT / YBR_ICT come back from the decoder as RGB (the codestream's colour transform
  is undone by OpenJPEG), and pydicom says so in its metadata.
* PALETTE COLOR: through ``pydicom.pixels.apply_color_lut``, then luma; 16-bit LUT entries are
  scaled by 255 / 65535.
* MONOCHROME2 as is, MONOCHROME1 inverted. More than 8 bits: the file's VOI LUT or window
  (after the modality LUT / rescale) when present, else min-max over the frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import struct
import warnings
from collections.abc import Iterator, Sequence

import numpy as np
import PIL.ExifTags
import PIL.Image
import PIL.ImageOps
import PIL.ImageSequence
import pydicom
import pydicom.dataset
import pydicom.encaps
import pydicom.errors
import pydicom.uid
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.utils import get_expected_length
from scipy import ndimage

CROP_MODES = ("auto", "regions", "bbox", "none")
MIN_SIDE = 16  # frames smaller than this (after crop) on either side are rejected
DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima", "")  # ".ima": Siemens exports
# Header values that mean "pydicom's pixel_array already converted this to RGB".
_CONVERTED_TO_RGB = ("YBR_FULL", "YBR_FULL_422", "YBR_RCT", "YBR_ICT")


class UnreadableError(Exception):
    """A file that cannot be turned into images; str(e) is a short human-readable reason."""


@dataclasses.dataclass(frozen=True)
class ImageFile:
    """The gray frames of one file plus the identifiers the caller needs (hashed by the caller)."""

    frames: tuple[np.ndarray, ...]  # each uint8 [H, W], gray, cropped when asked
    kind: str  # "dicom" or "image"
    patient_id: str | None  # raw PatientID (the caller hashes it; never store names)
    study_id: str | None  # StudyInstanceUID
    device: str | None  # "Manufacturer ManufacturerModelName" when present
    num_frames_in_file: int  # before stride / max_frames
    exif_orientation: int = 1  # the EXIF rotation / flip applied to the frames (1: none)


# ----------------------------------------------------------------------------- public helpers


def read_image_file(
    path: str | os.PathLike,
    *,
    frame_stride: int = 1,
    max_frames: int | None = None,
    crop: str = "auto",
) -> ImageFile:
    """Read a DICOM or image file into gray uint8 frames.

    Frames ``0, frame_stride, 2 * frame_stride, ...`` are kept, at most ``max_frames`` of them.
    crop: "auto" (DICOM Sequence of Ultrasound Regions when present, else image-based bounding box
    of the non-background area), "regions" (DICOM regions only, else no crop), "bbox" (image-based
    only), "none". A multi-frame file gets one crop box for all its frames (the box of the
    pixel-wise maximum) so the frames keep a common size.

    Raises ValueError for bad arguments (a caller bug) and UnreadableError for a bad file.
    """
    if isinstance(frame_stride, bool) or not isinstance(frame_stride, int) or frame_stride < 1:
        raise ValueError(f"frame_stride must be an integer >= 1, got {frame_stride!r}")
    if max_frames is not None and (
        isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < 1
    ):
        raise ValueError(f"max_frames must be None or an integer >= 1, got {max_frames!r}")
    if crop not in CROP_MODES:
        raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
    path = os.fspath(path)
    try:
        return _read(path, frame_stride, max_frames, crop)
    except UnreadableError:
        raise
    except Exception as e:  # last resort: a bad file must never crash the ingest
        raise UnreadableError(f"unexpected error: {type(e).__name__}: {_short(e)}") from e


def dicom_to_gray(
    ds: pydicom.Dataset, pixels: np.ndarray, *, photometric: str | None = None
) -> np.ndarray:
    """Decoded DICOM pixels of one frame [H, W(, S)] or of all frames [F, H, W(, S)] -> uint8 gray.

    ``photometric`` is the colour space of ``pixels`` as the decoder reports it (the ``meta``
    of ``Decoder.iter_array``). When None, ``pixels`` is assumed to be what pydicom's default
    ``ds.pixel_array`` returns: RGB for YBR_FULL / YBR_FULL_422 (pydicom converts them) and for
    JPEG 2000 YBR_RCT / YBR_ICT (the decoder undoes the colour transform), otherwise the header's
    interpretation. See the module docstring for the conversions. Raises UnreadableError for an
    interpretation it cannot convert faithfully.
    """
    header_pi = _photometric(ds)
    if photometric is None:
        photometric = "RGB" if header_pi in _CONVERTED_TO_RGB else header_pi
    pi = str(photometric).strip().upper()
    pixels = np.asarray(pixels)
    color = pi in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT") or pi.startswith(
        "YBR_PARTIAL"
    )
    frame_ndim = 3 if color else 2
    if pixels.ndim == frame_ndim + 1:
        return np.stack([dicom_to_gray(ds, f, photometric=pi) for f in pixels])
    if pixels.ndim != frame_ndim or (color and pixels.shape[-1] < 3):
        raise UnreadableError(
            f"pixel array of shape {pixels.shape} does not match photometric interpretation {pi}"
        )
    bits = int(ds.get("BitsStored") or 8 * pixels.dtype.itemsize)

    if pi == "RGB":
        return _luma(pixels[..., :3], bits)
    if pi in ("YBR_FULL", "YBR_FULL_422", "YBR_ICT"):
        return _scale_to_uint8(pixels[..., 0], bits)
    if pi in ("YBR_PARTIAL_422", "YBR_PARTIAL_420") and pixels.dtype == np.uint8:
        y = (pixels[..., 0].astype(np.float64) - 16.0) * (255.0 / 219.0)  # limited range Y
        return _round_uint8(y)
    if pi == "PALETTE COLOR":
        return _palette_to_gray(ds, pixels)
    if pi in ("MONOCHROME1", "MONOCHROME2"):
        gray = _monochrome_to_uint8(ds, pixels, bits)
        return 255 - gray if pi == "MONOCHROME1" else gray
    raise UnreadableError(f"unsupported photometric interpretation {pi!r}")


def scan_region_box(ds: pydicom.Dataset) -> tuple[int, int, int, int] | None:
    """(y0, x0, y1, x1) half-open union of the SequenceOfUltrasoundRegions, clipped to the image.

    DICOM RegionLocationMax{X1,Y1} are inclusive, hence +1. Every region counts (B-mode, Doppler
    strips, ECG traces, gray bars): the union is the scanner's own statement of where the
    acquired data lie. None when the sequence is absent, has no usable region, or the union is
    empty after clipping.
    """
    regions = ds.get("SequenceOfUltrasoundRegions")
    if not regions:
        return None
    rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
    boxes = []
    for region in regions:
        try:
            x0, y0 = int(region.RegionLocationMinX0), int(region.RegionLocationMinY0)
            x1, y1 = int(region.RegionLocationMaxX1) + 1, int(region.RegionLocationMaxY1) + 1
        except (AttributeError, TypeError, ValueError):
            continue
        if x1 > x0 and y1 > y0:
            boxes.append((y0, x0, y1, x1))
    if not boxes or rows <= 0 or cols <= 0:
        return None
    y0 = max(0, min(b[0] for b in boxes))
    x0 = max(0, min(b[1] for b in boxes))
    y1 = min(rows, max(b[2] for b in boxes))
    x1 = min(cols, max(b[3] for b in boxes))
    if y1 <= y0 or x1 <= x0:
        return None
    return (y0, x0, y1, x1)


def content_box(
    image: np.ndarray,
    threshold: int = 8,
    margin: int = 2,
    *,
    min_component_fraction: float = 0.05,
) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1) half-open box of the non-background area, grown by ``margin``.

    Foreground is ``image > threshold``. A 3x3 binary opening removes isolated and thin bright
    pixels (markers, calipers, 1-2 px text strokes) and connected components smaller than
    ``min_component_fraction`` of the largest one (burned-in text, logos, gray bars) are dropped,
    so the box follows the scan itself. The full image when nothing is found.
    """
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError(f"content_box expects a 2-D gray image, got shape {image.shape}")
    h, w = image.shape
    mask = ndimage.binary_opening(image > threshold, structure=np.ones((3, 3), bool))
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    if count == 0:
        return (0, 0, h, w)
    areas = np.bincount(labels.ravel())[1:]
    keep = np.flatnonzero(areas >= min_component_fraction * areas.max()) + 1
    ys, xs = np.nonzero(np.isin(labels, keep))
    return (
        max(0, int(ys.min()) - margin),
        max(0, int(xs.min()) - margin),
        min(h, int(ys.max()) + 1 + margin),
        min(w, int(xs.max()) + 1 + margin),
    )


def resize_shorter_side(image: np.ndarray, size: int) -> np.ndarray:
    """Resize a gray uint8 image so its shorter side is ``size``, keeping the aspect ratio.

    Bicubic when enlarging, box (area averaging, alias-free) when shrinking; PIL does both.
    """
    image = np.asarray(image)
    if image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(f"expected a 2-D uint8 image, got {image.dtype} {image.shape}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    h, w = image.shape
    short = min(h, w)
    if short == size:
        return image
    scale = size / short
    new_h = size if h == short else max(1, math.floor(h * scale + 0.5))
    new_w = size if w == short else max(1, math.floor(w * scale + 0.5))
    method = PIL.Image.Resampling.BICUBIC if size > short else PIL.Image.Resampling.BOX
    resized = PIL.Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), method)
    return np.asarray(resized, dtype=np.uint8)


# ----------------------------------------------------------------------------- reading


def _read(path: str, stride: int, max_frames: int | None, crop: str) -> ImageFile:
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError as e:
        raise UnreadableError(f"cannot open file: {_short(e)}") from e
    if not head:
        raise UnreadableError("empty file (0 bytes)")
    if _has_dicom_preamble(head):
        return _read_dicom(_dcmread(path, force=False), stride, max_frames, crop)
    suffix = os.path.splitext(path)[1].lower()
    if suffix in DICOM_SUFFIXES:
        ds = _try_force_dicom(path)
        if ds is not None:
            return _read_dicom(ds, stride, max_frames, crop)
    return _read_pil(path, stride, max_frames, crop)


def _has_dicom_preamble(head: bytes) -> bool:
    return len(head) >= 132 and head[128:132] == b"DICM"


def is_dicom_file(path: str | os.PathLike) -> bool:
    """True when the file starts with DICOM's preamble (128 bytes, then ``DICM``), whatever its
    name: PACS exports often name files by their UID (``1.2.840....123``)."""
    try:
        with open(path, "rb") as f:
            return _has_dicom_preamble(f.read(132))
    except OSError:
        return False


def exif_orientation(image: PIL.Image.Image) -> int:
    """The image's EXIF Orientation when it rotates or flips the image (2-8, what
    ``PIL.ImageOps.exif_transpose`` applies), else 1 (no tag, 1, or a value outside 1-8)."""
    value = image.getexif().get(PIL.ExifTags.Base.Orientation, 1)
    return int(value) if value in range(2, 9) else 1


def _frame_indices(n: int, stride: int, max_frames: int | None) -> list[int]:
    indices = list(range(0, n, stride))
    return indices[:max_frames] if max_frames is not None else indices


def _dcmread(path: str, *, force: bool) -> pydicom.Dataset:
    """dcmread that turns pydicom's "end of file" warnings into a truncation error.

    pydicom does not raise on a file cut short: it warns and, for encapsulated (compressed)
    data, silently drops the unfinished Pixel Data element, which would otherwise look like a
    DICOM without pixel data.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ds = pydicom.dcmread(path, force=force)
        except (
            pydicom.errors.InvalidDicomError,
            EOFError,
            OSError,
            ValueError,
            KeyError,
            struct.error,
        ) as e:
            raise UnreadableError(f"invalid DICOM: {_short(e)}") from e
    ended_early = any("end of file" in str(w.message).lower() for w in caught)
    if "PixelData" not in ds and (ended_early or _last_element_cut_short(ds)):
        raise UnreadableError("truncated DICOM: file ends before the end of its pixel data")
    return ds


def _last_element_cut_short(ds: pydicom.Dataset) -> bool:
    """Whether the last element read holds fewer bytes than its header declares.

    pydicom keeps elements raw until first accessed, with the declared length beside the bytes
    actually read; a file cut inside an element (e.g. a long palette LUT) shows up here.
    """
    tags = list(ds.keys())
    if not tags:
        return False
    raw = ds.get_item(tags[-1])
    length, value = getattr(raw, "length", None), getattr(raw, "value", None)
    if not isinstance(length, int) or length == 0xFFFFFFFF or not isinstance(value, bytes):
        return False
    return len(value) < length


def _try_force_dicom(path: str) -> pydicom.Dataset | None:
    """A DICOM without preamble (old files), or None when pydicom finds nothing DICOM-like."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = _dcmread(path, force=True)
        except UnreadableError:
            return None
    if "PixelData" in ds or "SOPClassUID" in ds:
        return ds
    return None


def _transfer_syntax(ds: pydicom.Dataset) -> pydicom.uid.UID:
    """The file's transfer syntax, or the encoding pydicom read a meta-less file with."""
    uid = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    if uid:
        return pydicom.uid.UID(uid)
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None or little is None:
        raise UnreadableError("invalid DICOM: no transfer syntax and unknown encoding")
    if implicit:
        uid = pydicom.uid.ImplicitVRLittleEndian
    else:
        uid = pydicom.uid.ExplicitVRLittleEndian if little else pydicom.uid.ExplicitVRBigEndian
    if not hasattr(ds, "file_meta"):
        ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = uid
    return uid


# How an encoded frame begins: JPEG family (SOI: baseline, lossless, JPEG-LS), JPEG 2000 and
# HTJ2K codestreams (SOC SIZ), JP2 files (signature box). A fragment that begins otherwise
# continues the frame before it.
_FRAME_STARTS = (b"\xff\xd8", b"\xff\x4f\xff\x51", b"\x00\x00\x00\x0cjP  ")


def _number_of_frames(ds: pydicom.Dataset, tsyntax: pydicom.uid.UID) -> int:
    """NumberOfFrames; without it (a malformed cine export), the frames the pixel data holds
    (recorded in ``ds``), not just the first: as many whole frames as its length holds if
    uncompressed; if encapsulated, the offset table's entries or, without one, the fragments
    that begin a frame (every fragment for RLE, which has one per frame)."""
    try:
        n = int(ds.get("NumberOfFrames") or 0)
    except (TypeError, ValueError):
        n = 0
    if n >= 1:
        return n
    n = 1
    with contextlib.suppress(Exception):  # malformed pixel data: the decoder will say so
        if not tsyntax.is_encapsulated:
            n = len(ds.PixelData) // get_expected_length(ds, unit="bytes")
        elif "ExtendedOffsetTable" in ds:
            n = len(ds.ExtendedOffsetTable) // 8  # 64-bit offsets
        else:
            buffer = io.BytesIO(ds.PixelData)
            n = len(pydicom.encaps.parse_basic_offsets(buffer))  # leaves buffer past the table
            if not n:
                fragments = pydicom.encaps.generate_fragments(buffer)
                rle = tsyntax == pydicom.uid.RLELossless
                n = sum(rle or f.startswith(_FRAME_STARTS) for f in fragments)
        n = max(n, 1)
    if n > 1:
        ds.NumberOfFrames = n
    return n


def _read_dicom(ds: pydicom.Dataset, stride: int, max_frames: int | None, crop: str) -> ImageFile:
    if "PixelData" not in ds:
        sop = ds.get("SOPClassUID")
        name = pydicom.uid.UID(str(sop)).name if sop else ""
        what = f" ({name})" if name else ""
        if "Image Storage" in name:  # an image SOP class: say what else it may be
            what = f" ({name} without Pixel Data: metadata-only or cut short)"
        raise UnreadableError(f"no pixel data: not an image DICOM{what}")
    tsyntax = _transfer_syntax(ds)
    ts_name = f"{tsyntax.name} ({tsyntax})" if tsyntax.name != str(tsyntax) else str(tsyntax)
    try:
        decoder = get_decoder(tsyntax)
    except NotImplementedError as e:
        raise UnreadableError(
            f"unsupported transfer syntax {ts_name}: pydicom has no decoder for it"
        ) from e
    if not decoder.is_available:
        missing = "; ".join(decoder.missing_dependencies) or "no plugin"
        raise UnreadableError(f"unsupported transfer syntax {ts_name}: missing codec ({missing})")

    n_file = _number_of_frames(ds, tsyntax)
    indices = _frame_indices(n_file, stride, max_frames)
    frames = []
    try:
        for pixels, meta in decoder.iter_array(ds, indices=indices, raw=True):
            frames.append(dicom_to_gray(ds, pixels, photometric=meta["photometric_interpretation"]))
    except UnreadableError:
        raise
    except Exception as e:
        text = _short(e)
        if "less than expected" in text or "insufficient" in text.lower():
            raise UnreadableError(
                f"truncated DICOM: pixel data shorter than declared ({text})"
            ) from e
        raise UnreadableError(f"cannot decode pixel data ({ts_name}): {text}") from e

    box = None
    if crop in ("auto", "regions"):
        box = scan_region_box(ds)
    if box is None and crop in ("auto", "bbox"):
        box = _shared_content_box(frames)
    return ImageFile(
        frames=_crop_all(frames, box),
        kind="dicom",
        patient_id=_text(ds, "PatientID"),
        study_id=_text(ds, "StudyInstanceUID"),
        device=" ".join(
            v for v in (_text(ds, "Manufacturer"), _text(ds, "ManufacturerModelName")) if v
        )
        or None,
        num_frames_in_file=n_file,
    )


def _read_pil(path: str, stride: int, max_frames: int | None, crop: str) -> ImageFile:
    try:
        image = PIL.Image.open(path)
    except PIL.UnidentifiedImageError as e:
        raise UnreadableError("not a DICOM or image file") from e
    except PIL.Image.DecompressionBombError as e:
        raise UnreadableError(f"image too large: {_short(e)}") from e
    except Exception as e:  # PIL raises SyntaxError, ValueError, struct.error... on bad headers
        raise UnreadableError(f"corrupt image header: {_short(e)}") from e
    with image:
        fmt = image.format or "image"
        # an MPO (a camera's JPEG) holds one picture; its other frames are previews or views
        n_file = 1 if fmt == "MPO" else max(int(getattr(image, "n_frames", 1) or 1), 1)
        indices = _frame_indices(n_file, stride, max_frames)
        frames = []
        try:
            # the orientation the frames are turned by (_pil_to_gray turns a single frame,
            # Pillow every page of a TIFF as it loads it: so read it before loading)
            orientation = exif_orientation(image) if n_file == 1 or fmt == "TIFF" else 1
            for frame in _pil_frames(image, indices):
                frames.append(_pil_to_gray(frame, single=n_file == 1))
            if len(frames) != len(indices):
                raise EOFError(f"{len(frames)} of {len(indices)} frames could be read")
        except UnreadableError:
            raise
        except Exception as e:  # truncated data (OSError), bad seek (EOFError), ...
            raise UnreadableError(f"truncated or corrupt {fmt} image: {_short(e)}") from e
    box = _shared_content_box(frames) if crop in ("auto", "bbox") else None
    return ImageFile(
        frames=_crop_all(frames, box),
        kind="image",
        patient_id=None,
        study_id=None,
        device=None,
        num_frames_in_file=n_file,
        exif_orientation=orientation,
    )


def _pil_frames(image: PIL.Image.Image, indices: Sequence[int]) -> Iterator[PIL.Image.Image]:
    """The selected frames of a (possibly multi-page) image, each fully loaded."""
    wanted = set(indices)
    last = max(indices)
    for i, frame in enumerate(PIL.ImageSequence.Iterator(image)):
        if i in wanted:
            _refuse_transposed_tiff(frame)
            frame.load()  # decode now: truncated data raises here, not later
            yield frame
        if i >= last:
            return


def _refuse_transposed_tiff(frame: PIL.Image.Image) -> None:
    """Pillow (13.0) applies a TIFF's orientation as it loads it, and scrambles the pixels of
    one that swaps rows and columns (orientation 5-8): such a frame is refused, not misread."""
    if frame.format != "TIFF":
        return
    orientation = frame.getexif().get(PIL.ExifTags.Base.Orientation, 1)
    if orientation in (5, 6, 7, 8):
        raise UnreadableError(
            f"TIFF with orientation {orientation} (rotated or transposed by 90 degrees): "
            "Pillow cannot read it correctly; save it without the Orientation tag"
        )


def _pil_to_gray(frame: PIL.Image.Image, *, single: bool) -> np.ndarray:
    """One PIL frame -> uint8 gray: BT.601 luma for colour, min-max for >8-bit gray."""
    if single:
        frame = PIL.ImageOps.exif_transpose(frame)  # photos of screens may carry a rotation
    if frame.mode == "L":
        return np.array(frame, dtype=np.uint8)
    if frame.mode.startswith("I") or frame.mode == "F":  # I;16, I;16B, I (32-bit), F
        return _min_max(np.asarray(frame))
    try:
        gray = frame.convert("L")
    except ValueError:
        gray = frame.convert("RGB").convert("L")
    return np.array(gray, dtype=np.uint8)


# ----------------------------------------------------------------------------- crop


def _shared_content_box(frames: Sequence[np.ndarray]) -> tuple[int, int, int, int] | None:
    """One content box for all frames (of their pixel-wise max); None if sizes differ."""
    if not frames:
        return None
    if any(f.shape != frames[0].shape for f in frames):
        return None  # per-frame boxes, see _crop_all
    return content_box(np.maximum.reduce(list(frames)) if len(frames) > 1 else frames[0])


def _crop_all(
    frames: Sequence[np.ndarray], box: tuple[int, int, int, int] | None
) -> tuple[np.ndarray, ...]:
    out = []
    shapes_differ = any(f.shape != frames[0].shape for f in frames)
    for frame in frames:
        b = box
        if b is None and shapes_differ:
            b = content_box(frame)
        if b is not None:
            y0, x0, y1, x1 = b
            frame = frame[y0:y1, x0:x1]
        if min(frame.shape) < MIN_SIDE:
            raise UnreadableError(
                f"image too small after crop: {frame.shape[0]}x{frame.shape[1]} px "
                f"(minimum {MIN_SIDE} px a side)"
            )
        out.append(np.ascontiguousarray(frame, dtype=np.uint8).copy())
    if not out:
        raise UnreadableError("no frames")
    return tuple(out)


# ----------------------------------------------------------------------------- pixel maths


def _photometric(ds: pydicom.Dataset) -> str:
    return str(ds.get("PhotometricInterpretation") or "").strip().upper()


def _round_uint8(x: np.ndarray) -> np.ndarray:
    """Round half up and clip to uint8."""
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


def _scale_to_uint8(values: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned data with ``bits`` significant bits -> uint8 (identity for 8-bit data)."""
    if values.dtype == np.uint8:
        return values.copy()
    top = float(2 ** max(bits, 1) - 1)
    return _round_uint8(values.astype(np.float64) * (255.0 / top))


def _luma(rgb: np.ndarray, bits: int) -> np.ndarray:
    """BT.601 luma; 8-bit data with PIL's fixed-point formula (bit-identical to convert("L"))."""
    if rgb.dtype == np.uint8:
        r, g, b = (rgb[..., i].astype(np.uint32) for i in range(3))
        return ((19595 * r + 38470 * g + 7471 * b + 32768) >> 16).astype(np.uint8)
    y = rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114
    return _round_uint8(y * (255.0 / float(2 ** max(bits, 1) - 1)))


def _palette_to_gray(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """PALETTE COLOR: apply_color_lut on the whole LUT once, luma per entry, then index."""
    try:
        desc = [int(v) for v in ds.RedPaletteColorLookupTableDescriptor]
        entries, first = desc[0] or 2**16, desc[1]
        table = apply_color_lut(np.arange(first, first + entries, dtype=np.int64), ds)[:, :3]
    except Exception as e:
        raise UnreadableError(f"invalid palette colour lookup table: {_short(e)}") from e
    # 16-bit entries span 0..65535; some writers put 8-bit values in 16-bit entries.
    bits = 16 if table.dtype == np.uint16 and int(table.max()) > 255 else 8
    gray_table = (
        _luma(table.astype(np.uint8), 8)
        if bits == 8
        else _luma(table.astype(np.float64), 16)  # float path: scaled by 255 / 65535
    )
    index = np.clip(pixels.astype(np.int64) - first, 0, entries - 1)
    return gray_table[index]


def _min_max(values: np.ndarray) -> np.ndarray:
    """Stretch one frame to 0..255; a constant frame becomes 0."""
    values = values.astype(np.float64)
    lo, hi = float(values.min()), float(values.max())
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise UnreadableError("non-finite pixel values")
    if hi <= lo:
        return np.zeros(values.shape, np.uint8)
    return _round_uint8((values - lo) * (255.0 / (hi - lo)))


def _monochrome_to_uint8(ds: pydicom.Dataset, pixels: np.ndarray, bits: int) -> np.ndarray:
    """Gray DICOM -> uint8 before any MONOCHROME1 inversion: 8-bit as is, else VOI or min-max.

    The VOI LUT / window of 8-bit files is deliberately not applied (ultrasound scanners store
    display-ready 8-bit pixels; e.g. the EPIQ file of pydicom-data carries an identity-like
    window 127/254).
    """
    if pixels.dtype.kind == "u" and bits <= 8:  # 8 bits as is; fewer (rare) stretched to 8
        if bits == 8:
            return np.clip(pixels, 0, 255).astype(np.uint8)
        top = 2 ** max(bits, 1) - 1
        return _round_uint8(np.minimum(pixels, top).astype(np.float64) * (255.0 / top))
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if has_lut or has_window:
        try:
            values = apply_voi_lut(apply_modality_lut(pixels, ds), ds, index=0, prefer_lut=True)
            if has_lut:
                lo, hi = 0.0, float(2 ** int(ds.VOILUTSequence[0].LUTDescriptor[2]) - 1)
            else:  # the windowing output range, as pydicom chose it
                with np.errstate(all="ignore"):
                    probe = apply_voi_lut(np.array([-1e9, 1e9]), ds, index=0, prefer_lut=False)
                lo, hi = float(probe.min()), float(probe.max())
            if hi > lo:
                return _round_uint8((np.asarray(values, np.float64) - lo) * (255.0 / (hi - lo)))
        except Exception:  # a malformed VOI module: fall back to min-max below
            pass
    try:  # the modality values: a negative rescale slope makes bright what is stored dark
        values = apply_modality_lut(pixels, ds)
    except Exception:  # an empty or malformed rescale / modality LUT: the stored values
        values = pixels
    return _min_max(values)


# ----------------------------------------------------------------------------- misc


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _short(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
