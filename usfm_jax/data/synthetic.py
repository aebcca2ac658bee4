"""Deterministic synthetic B-mode ultrasound phantoms (numpy/scipy only).

The embedded default data set of the pre-training demo: no download, bit-reproducible, and with
the image statistics that matter for masked image modelling of ultrasound (a fan, speckle, dark
fluid, bright interfaces, shadows). Each image is a cheap caricature of a B-mode pipeline:

1. **Probe geometry**: ``linear`` (rectangular field, vertical beams) or a fan, ``sector``
   (phased array, apex at the top centre) or ``convex`` (curved array, virtual apex above the
   image). Echoes are simulated on the *beam grid* (depth x beam); fans are then scan-converted
   to the Cartesian image and everything outside the fan is exactly 0.
2. **Tissue map**: a per-organ recipe (``ORGANS``) places soft-edged layers and blobs, each with
   a backscatter level (dB re. reference tissue), an attenuation coefficient and optionally a
   bright specular rim (capsules, fascia, vessel walls, skull). Anechoic fluid (cysts, vessels,
   heart chambers, amniotic fluid) has near-zero backscatter.
3. **Attenuation**: the two-way intensity loss ``exp(-integral of alpha)`` is accumulated along
   every beam (a cumulative sum over depth) and time-gain compensation (TGC) undoes most of the
   loss of the *average* tissue. Weakly attenuating fluid therefore gives posterior acoustic
   enhancement and strongly attenuating reflectors (stones, calcifications, bone, gas) a dark
   acoustic shadow behind them, vertical for linear and radial for fan probes.
4. **Speckle**: circular complex Gaussian scatterers whose variance is the local backscatter
   power are convolved with a separable Gaussian point-spread function. This is the baseband (IQ)
   form of a Gabor pulse: for circular scatterers, demodulating the carrier ``cos(k z)`` leaves
   the envelope statistics unchanged, so the carrier is not simulated. The envelope is the modulus
   of the complex signal (fully developed, Rayleigh speckle). Specular interfaces reflect
   coherently (a smooth bright line, not speckle). A display-referred noise floor keeps
   fluid and shadows from being perfectly black.
5. **Log compression**: intensity in dB mapped over a 50-60 dB dynamic range to uint8, after a
   light smoothing of the log image (as scanners apply) that softens the deep speckle nulls.

Downstream tasks: ``generate_lesion_case`` renders breast scenes with exactly one lesion,
benign-like or malignant-like by shape and echo pattern, with its mask; every labelled render
also gives the speckle-free image of the same scene (despeckling targets) and the mask of all
focal lesions.

Randomness comes from ``np.random.SeedSequence([seed, index, stream, ...])`` so each image is
independent and reproducible; the anatomy is drawn in resolution-independent units (depth 1 =
image height) from its own stream. The random draws are platform independent; the float32
pipeline uses numpy/scipy transcendental functions whose last-ulp rounding may in principle
differ between CPU builds, so bit-identity across machines assumes the same numpy/scipy builds.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy import ndimage

ORGANS: tuple[str, ...] = ("liver", "kidney", "thyroid", "breast", "heart", "fetal")
GEOMETRIES: tuple[str, ...] = ("linear", "sector", "convex")

MIN_IMAGE_SIDE = 16
# SeedSequence stream tags: the organ draw and the image never share random numbers.
_ORGAN_STREAM = 1
_IMAGE_STREAM = 2
_LESION_STREAM = 3  # lesion cases of the downstream tasks
_LESION_CLASS_STREAM = 4

FLUID_DB = -45.0  # backscatter of anechoic fluid, dB re. reference tissue
FLUID_ATT = 0.5  # intensity attenuation of fluid, nepers per image height
SHADOW_ATT = 400.0  # attenuation of stones / calcifications / bone / gas
NOISE_FLOOR_DB = -42.0  # display-referred (after TGC) electronic noise power
DISPLAY_TOP_DB = 18.0  # intensity mapped to 255, dB re. mean reference-tissue intensity
DYNAMIC_RANGE_DB = (50.0, 60.0)
GAIN_JITTER_DB = 3.0  # per-image overall gain knob
TGC_FRACTION = (0.85, 1.0)  # fraction of the mean tissue attenuation undone by TGC
FAN_EDGE_LOSS = 0.4  # intensity loss of the outermost beams (element directivity)
PSF_AXIAL_SIGMA = (0.0045, 0.007)  # axial PSF std, in image heights
PSF_LATERAL_SIGMA = (0.008, 0.014)  # lateral PSF std at mid depth, in image heights
PSF_MIN_SIGMA_PX = (0.6, 0.8)  # axial / lateral floor in pixels so speckle stays resolved
PSF_TRUNCATE = 3.0  # Gaussian PSF support in standard deviations
VIDEO_SMOOTH_PX = 0.7  # scanner's smoothing of the log image, softens the speckle nulls
# Mean of the log of fully developed speckle intensity, below the log of its mean: Euler's
# gamma in nepers (E[ln I] = ln E[I] - gamma for exponential I), in dB. The speckle-free image
# is shifted by it so that it equals the local mean of the speckled log image.
SPECKLE_LOG_BIAS_DB = 10 * 0.5772156649015329 / math.log(10)
_TINY = 1e-12  # keeps log10 finite
TEXTURE_WAVENUMBER = (4.0, 12.0)  # slow echogenicity variation, radians per image height
SECTOR_HALF_ANGLE_DEG = (30.0, 45.0)  # 60-90 degree opening
CONVEX_HALF_ANGLE_DEG = (25.0, 36.0)
CONVEX_APEX_DEPTH = (0.35, 0.8)  # radius of curvature of the convex array, image heights


# ----------------------------------------------------------------------------------------
# Geometry
# ----------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Coords:
    """Sample positions in image heights: lateral ``x``, Cartesian depth ``z`` and depth along
    the beam below the probe surface ``d`` (arrays broadcastable to one shape)."""

    x: np.ndarray
    z: np.ndarray
    d: np.ndarray


@dataclasses.dataclass(frozen=True)
class _Frame:
    """Probe geometry of one image; lengths in image heights, angles in radians."""

    geometry: str
    half_width: float  # W / (2 H)
    half_angle: float = 0.0
    apex_z: float = 0.0
    r_min: float = 0.0
    r_max: float = 1.0

    def lateral_extent(self, z: float) -> float:
        """Half-width of the imaged field at Cartesian depth ``z``."""
        if self.geometry == "linear":
            return self.half_width
        return min(self.half_width, (z - self.apex_z) * math.tan(self.half_angle))

    def lateral(self, rng: np.random.Generator, z: float, frac: float = 0.7) -> float:
        """A lateral position inside the central ``frac`` of the field at depth ``z``."""
        return _u(rng, -frac, frac) * self.lateral_extent(z)


def _draw_frame(rng: np.random.Generator, weights: Sequence[float], h: int, w: int) -> _Frame:
    geometry = GEOMETRIES[int(rng.choice(len(GEOMETRIES), p=weights))]
    half_width = w / (2 * h)
    if geometry == "linear":
        return _Frame(geometry, half_width)
    if geometry == "sector":
        half_angle = math.radians(_u(rng, *SECTOR_HALF_ANGLE_DEG))
        return _Frame(geometry, half_width, half_angle, 0.0, 0.0, _u(rng, 0.92, 1.0))
    half_angle = math.radians(_u(rng, *CONVEX_HALF_ANGLE_DEG))
    radius = _u(rng, *CONVEX_APEX_DEPTH)
    return _Frame(geometry, half_width, half_angle, -radius, radius, radius + _u(rng, 0.92, 1.0))


def _image_coords(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre lateral (1, W) and depth (H, 1) positions in image heights."""
    x = ((np.arange(w, dtype=np.float32) + 0.5 - w / 2) / h)[None, :]
    z = ((np.arange(h, dtype=np.float32) + 0.5) / h)[:, None]
    return x, z


def _polar(frame: _Frame, x: np.ndarray, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Radius and steering angle (from the vertical) of Cartesian points for a fan frame."""
    dz = z - np.float32(frame.apex_z)
    return np.hypot(x, dz), np.arctan2(x, dz)


def _fan_mask(frame: _Frame, r: np.ndarray, theta: np.ndarray) -> np.ndarray:
    return (r >= frame.r_min) & (r <= frame.r_max) & (np.abs(theta) <= frame.half_angle)


# ----------------------------------------------------------------------------------------
# Tissue structures
# ----------------------------------------------------------------------------------------


def _unit_clip(a: np.ndarray) -> np.ndarray:
    """Clip a fresh array to [0, 1] in place (ufuncs: cheaper than np.clip on small arrays)."""
    return np.minimum(np.maximum(a, 0.0, out=a), 1.0, out=a)


@dataclasses.dataclass(frozen=True)
class _Blob:
    """A soft-edged (optionally lobulated) ellipse of homogeneous tissue."""

    x: float
    z: float
    ax: float  # semi-axis along the rotated lateral direction
    az: float  # semi-axis along the rotated depth direction
    echo_db: float
    att: float
    angle: float = 0.0
    edge: float = 0.012  # border width
    wobble: float = 0.0  # border irregularity, fraction of the radius
    lobes: int = 5
    phase: float = 0.0
    rim_db: float | None = None  # bright specular rim (capsule / wall) level
    rim_width: float = 0.006
    rim_att: float = 0.0  # attenuation of the rim (bone / calcified wall)
    fluid: bool = False
    lesion: bool = False  # part of a focal lesion (nodule, mass, lesion cyst): lesion_mask

    def field(self, c: _Coords) -> tuple[np.ndarray, np.ndarray]:
        """(membership in [0, 1], approximate signed distance to the border)."""
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        dx, dz = c.x - np.float32(self.x), c.z - np.float32(self.z)
        u = dx * (cos / self.ax) + dz * (sin / self.ax)
        v = dz * (cos / self.az) - dx * (sin / self.az)
        rho = np.hypot(u, v)
        if self.wobble:
            rho *= 1.0 + self.wobble * np.sin(self.lobes * np.arctan2(v, u) + self.phase)
        radius = math.sqrt(self.ax * self.az)
        s = rho * radius - radius
        return _unit_clip(0.5 - s * (1.0 / self.edge)), s


@dataclasses.dataclass(frozen=True)
class _Layer:
    """A tissue layer parallel to the probe surface, with a wavy top boundary."""

    depth: float  # top boundary, depth along the beam
    thickness: float  # math.inf: extends to the bottom
    echo_db: float
    att: float
    wave: float = 0.0  # amplitude of the top-boundary undulation
    freq: float = 10.0  # its lateral wavenumber, radians per image height
    phase: float = 0.0
    edge: float = 0.01
    rim_db: float | None = None  # specular interface at the top boundary
    rim_width: float = 0.005
    rim_att: float = 0.0
    fluid: bool = False
    lesion: bool = False

    def field(self, c: _Coords) -> tuple[np.ndarray, np.ndarray]:
        """(membership in [0, 1], signed distance below the top boundary)."""
        s = c.d - np.float32(self.depth)
        if self.wave:
            s = s - self.wave * np.sin(self.freq * c.x + self.phase)
        m = _unit_clip(0.5 + s * (1.0 / self.edge))
        if math.isfinite(self.thickness):
            m *= _unit_clip((0.5 + self.thickness / self.edge) - s * (1.0 / self.edge))
        return m, s


_Structure = _Blob | _Layer


@dataclasses.dataclass(frozen=True)
class _Scene:
    """A tissue recipe instance: background tissue plus structures in painting order."""

    background_db: float
    attenuation: float  # mean tissue attenuation, nepers per image height (two-way)
    texture_db: float  # amplitude of slow echogenicity variation
    structures: tuple[_Structure, ...]


def _u(rng: np.random.Generator, lo: float, hi: float) -> float:
    """A uniform draw as a Python float (so float32 arrays stay float32)."""
    return float(rng.uniform(lo, hi))


def _angle(rng: np.random.Generator, max_deg: float) -> float:
    return math.radians(_u(rng, -max_deg, max_deg))


def _phase(rng: np.random.Generator) -> float:
    return _u(rng, 0.0, 2 * math.pi)


def _offset(x: float, z: float, angle: float, u: float, v: float) -> tuple[float, float]:
    """The point (x, z) + (u, v) rotated by ``angle``: a position in a rotated organ's frame."""
    cos, sin = math.cos(angle), math.sin(angle)
    return x + u * cos - v * sin, z + u * sin + v * cos


def _fluid_blob(x: float, z: float, ax: float, az: float, angle: float = 0.0, **kw) -> _Blob:
    return _Blob(x, z, ax, az, FLUID_DB, FLUID_ATT, angle=angle, fluid=True, **kw)


def _calcification(x: float, z: float, size: float, echo_db: float = 8.0, **kw) -> _Blob:
    """A small, very bright and very attenuating reflector casting an acoustic shadow."""
    return _Blob(x, z, size, 0.7 * size, echo_db, SHADOW_ATT, edge=0.005, **kw)


def _body_wall(rng: np.random.Generator, thin: bool = False) -> list[_Structure]:
    """Skin, subcutaneous fat and muscle layers with bright fascia under a probe."""
    scale = 0.6 if thin else 1.0
    skin = _u(rng, 0.01, 0.02)
    fat = scale * _u(rng, 0.03, 0.08)
    muscle = scale * _u(rng, 0.03, 0.07)
    wave = dict(wave=_u(rng, 0.002, 0.008), freq=_u(rng, 6, 20), phase=_phase(rng))
    return [
        _Layer(0.0, skin, _u(rng, -3, 1), 6.0),
        _Layer(skin, fat, _u(rng, -20, -15), 5.0, **wave),
        _Layer(skin + fat, muscle, _u(rng, -14, -10), 7.0, rim_db=_u(rng, -4, 0), **wave),
        _Layer(skin + fat + muscle, 0.006, _u(rng, -2, 2), 6.0, edge=0.004),
    ]


# ----------------------------------------------------------------------------------------
# Organ recipes: (rng, frame) -> scene. Echo levels in dB re. reference tissue, attenuation
# in nepers per image height; structures later in the list are painted on top.
# ----------------------------------------------------------------------------------------


def _liver(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Homogeneous parenchyma, portal/hepatic vessels, gallbladder (+stone), diaphragm."""
    parts: list[_Structure] = []
    if rng.random() < 0.6:  # curved bright diaphragm with the (mirrored) lung below
        parts.append(
            _Layer(
                depth=_u(rng, 0.72, 0.88),
                thickness=math.inf,
                echo_db=_u(rng, -10, -6),
                att=6.0,
                wave=_u(rng, 0.03, 0.08),
                freq=_u(rng, 2, 4),
                phase=_phase(rng),
                rim_db=_u(rng, 4, 8),
                rim_width=0.008,
            )
        )
    for _ in range(int(rng.integers(2, 6))):  # vessels; portal veins have bright walls
        z = _u(rng, 0.25, 0.75)
        r = _u(rng, 0.015, 0.045)
        rim_db = _u(rng, -6, 0) if rng.random() < 0.5 else None
        x = f.lateral(rng, z)
        elongation, angle = _u(rng, 1.2, 4.0), _angle(rng, 60)
        parts.append(_fluid_blob(x, z, r * elongation, r, angle, rim_db=rim_db, rim_width=0.004))
    if rng.random() < 0.3:  # gallbladder, sometimes with a shadowing stone
        z = _u(rng, 0.35, 0.6)
        x = f.lateral(rng, z, 0.5)
        ax, az = _u(rng, 0.07, 0.13), _u(rng, 0.04, 0.07)
        parts.append(_fluid_blob(x, z, ax, az, _angle(rng, 25), rim_db=_u(rng, -4, 0)))
        if rng.random() < 0.6:
            parts.append(_calcification(x + _u(rng, -0.5, 0.5) * ax, z + 0.7 * az, 0.015))
    if rng.random() < 0.3:  # focal lesion, hypo- or hyperechoic
        z = _u(rng, 0.3, 0.7)
        parts.append(
            _Blob(
                x=f.lateral(rng, z),
                z=z,
                ax=_u(rng, 0.03, 0.08),
                az=_u(rng, 0.03, 0.07),
                echo_db=_u(rng, -16, -10) if rng.random() < 0.5 else _u(rng, 0, 4),
                att=8.0,
                wobble=_u(rng, 0.0, 0.15),
                lobes=int(rng.integers(3, 8)),
                phase=_phase(rng),
                edge=0.02,
                lesion=True,
            )
        )
    parts += _body_wall(rng, thin=f.geometry == "sector")
    return _Scene(_u(rng, -8, -4), _u(rng, 7, 10), _u(rng, 0.5, 2.0), tuple(parts))


def _kidney(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Hypoechoic cortex, dark pyramids, bright sinus fat, capsule; cysts and stones."""
    z = _u(rng, 0.42, 0.58)
    x = f.lateral(rng, z, 0.2)
    ax, az = _u(rng, 0.22, 0.32), _u(rng, 0.12, 0.17)
    angle = _angle(rng, 25)
    cortex_db, capsule_db = _u(rng, -16, -12), _u(rng, 0, 4)
    parts: list[_Structure] = [
        _Blob(x, z, ax, az, cortex_db, 7.0, angle, rim_db=capsule_db, rim_width=0.007)
    ]
    n_pyramids = int(rng.integers(4, 8))
    for k in range(n_pyramids):  # medullary pyramids around the sinus
        t = 2 * math.pi * (k + _u(rng, -0.2, 0.2)) / n_pyramids
        px, pz = _offset(x, z, angle, 0.62 * ax * math.cos(t), 0.55 * az * math.sin(t))
        r = _u(rng, 0.018, 0.03)
        parts.append(_Blob(px, pz, r, r, -24.0, 5.0, edge=0.01))
    parts.append(  # renal sinus fat
        _Blob(
            x=x,
            z=z,
            ax=0.5 * ax,
            az=0.4 * az,
            echo_db=_u(rng, -2, 3),
            att=9.0,
            angle=angle,
            wobble=_u(rng, 0.1, 0.25),
            lobes=int(rng.integers(3, 6)),
            phase=_phase(rng),
            edge=0.015,
        )
    )
    if rng.random() < 0.4:  # simple cortical cyst
        t = _phase(rng)
        cx, cz = _offset(x, z, angle, 0.75 * ax * math.cos(t), 0.7 * az * math.sin(t))
        r = _u(rng, 0.03, 0.06)
        parts.append(_fluid_blob(cx, cz, r, 0.9 * r, lesion=True))
    if rng.random() < 0.35:  # stone in the sinus
        parts.append(_calcification(x + _u(rng, -0.3, 0.3) * ax, z, _u(rng, 0.012, 0.02)))
    parts += _body_wall(rng)
    return _Scene(_u(rng, -9, -5), _u(rng, 6, 9), _u(rng, 0.5, 2.0), tuple(parts))


def _thyroid(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Bright homogeneous lobe under strap muscles, carotid artery, trachea shadow, nodules."""
    side = 1.0 if rng.random() < 0.5 else -1.0  # the trachea's side
    z = _u(rng, 0.3, 0.42)
    x = side * _u(rng, 0.0, 0.15) * f.lateral_extent(z)
    ax, az = _u(rng, 0.18, 0.28), _u(rng, 0.11, 0.16)
    lobe_db, capsule_db = _u(rng, -3, 0), _u(rng, -4, 0)
    parts: list[_Structure] = [
        _Blob(x, z, ax, az, lobe_db, 6.0, _angle(rng, 10), rim_db=capsule_db)
    ]
    r = _u(rng, 0.045, 0.07)  # carotid artery, lateral to the lobe
    parts.append(_fluid_blob(x - side * (ax + r), z + _u(rng, -0.02, 0.06), r, r, rim_db=2.0))
    if rng.random() < 0.6:  # trachea: gas behind a curved bright wall
        tx = side * f.lateral_extent(z) * _u(rng, 0.75, 1.0)
        parts.append(_Blob(tx, z - 0.05, 0.12, 0.1, 4.0, SHADOW_ATT, edge=0.004, rim_db=10.0))
    for _ in range(int(rng.integers(0, 3))):  # nodules: cystic, solid or calcified
        nx, nz = x + _u(rng, -0.5, 0.5) * ax, z + _u(rng, -0.4, 0.4) * az
        nr = _u(rng, 0.02, 0.05)
        kind = rng.random()
        if kind < 0.4:
            parts.append(_fluid_blob(nx, nz, nr, 0.9 * nr, rim_db=-6.0, lesion=True))
        elif kind < 0.8:
            parts.append(
                _Blob(
                    x=nx,
                    z=nz,
                    ax=nr,
                    az=nr * _u(rng, 0.7, 1.3),
                    echo_db=_u(rng, -18, -4),
                    att=7.0,
                    wobble=_u(rng, 0, 0.2),
                    lobes=int(rng.integers(3, 7)),
                    phase=_phase(rng),
                    rim_db=-8.0 if rng.random() < 0.5 else None,  # halo
                    lesion=True,
                )
            )
        else:
            parts.append(_calcification(nx, nz, _u(rng, 0.006, 0.012), lesion=True))
    skin, subcut, strap = _u(rng, 0.012, 0.02), _u(rng, 0.03, 0.06), _u(rng, 0.05, 0.09)
    wave = dict(wave=_u(rng, 0.005, 0.015), freq=_u(rng, 4, 10), phase=_phase(rng))
    parts += [
        _Layer(0.0, skin, _u(rng, -2, 2), 6.0),
        _Layer(skin, subcut, _u(rng, -14, -10), 6.0),
        _Layer(skin + subcut, strap, _u(rng, -18, -14), 7.0, rim_db=-4.0, **wave),
    ]
    return _Scene(_u(rng, -12, -9), _u(rng, 6, 9), _u(rng, 0.5, 1.5), tuple(parts))


def _breast_tissue(
    rng: np.random.Generator, f: _Frame
) -> tuple[list[_Structure], tuple[float, float, float]]:
    """Breast structures below the skin and the (skin, fat, gland) thicknesses."""
    skin, fat, gland = _u(rng, 0.012, 0.02), _u(rng, 0.1, 0.22), _u(rng, 0.2, 0.35)
    muscle_top = skin + fat + gland + _u(rng, 0.05, 0.12)
    gland_wave = dict(wave=_u(rng, 0.02, 0.05), freq=_u(rng, 8, 16), phase=_phase(rng))
    muscle_wave = dict(wave=0.01, freq=_u(rng, 2, 5), phase=_phase(rng))
    parts: list[_Structure] = [
        _Layer(skin + fat, gland, _u(rng, -3, 1), 8.0, **gland_wave),
        _Layer(muscle_top, math.inf, _u(rng, -13, -10), 7.0, rim_db=_u(rng, -2, 2), **muscle_wave),
    ]
    for _ in range(int(rng.integers(2, 6))):  # fat lobules
        z = skin + _u(rng, 0.3, 0.8) * fat
        r = _u(rng, 0.03, 0.06)
        parts.append(_Blob(f.lateral(rng, z, 0.9), z, 1.6 * r, r, -21.0, 5.0, rim_db=-10.0))
    if rng.random() < 0.4:  # rib below the muscle
        z = muscle_top + _u(rng, 0.08, 0.15)
        x, half_length = f.lateral(rng, z), _u(rng, 0.08, 0.14)
        parts.append(_Blob(x, z, half_length, 0.04, 2.0, SHADOW_ATT, edge=0.004, rim_db=10.0))
    return parts, (skin, fat, gland)


def _breast_scene(rng: np.random.Generator, parts: list[_Structure], skin: float) -> _Scene:
    """The breast scene: ``parts`` under the skin layers, on dark fat."""
    parts += [
        _Layer(0.0, skin, _u(rng, -2, 2), 6.0),
        _Layer(skin, 0.004, -4.0, 6.0, edge=0.004),
    ]
    return _Scene(_u(rng, -20, -16), _u(rng, 5, 8), _u(rng, 1.0, 3.0), tuple(parts))


def _breast(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Dark fat over bright fibroglandular tissue, pectoral muscle, rib shadow, one lesion."""
    parts, (skin, fat, gland) = _breast_tissue(rng, f)
    if rng.random() < 0.75:  # cyst (posterior enhancement) or solid mass (posterior shadowing)
        z = skin + fat + _u(rng, 0.2, 0.8) * gland
        x = f.lateral(rng, z, 0.6)
        r = _u(rng, 0.04, 0.09)
        if rng.random() < 0.5:
            parts.append(_fluid_blob(x, z, r * _u(rng, 1.0, 1.6), r, _angle(rng, 20), lesion=True))
        else:
            parts.append(
                _Blob(
                    x=x,
                    z=z,
                    ax=r,
                    az=r * _u(rng, 0.9, 1.4),  # often taller than wide
                    echo_db=_u(rng, -22, -16),
                    att=_u(rng, 14, 24),
                    wobble=_u(rng, 0.1, 0.3),  # spiculated margin
                    lobes=int(rng.integers(5, 10)),
                    phase=_phase(rng),
                    edge=0.008,
                    lesion=True,
                )
            )
    return _breast_scene(rng, parts, skin)


def _benign_like(rng: np.random.Generator, x: float, z: float, r: float) -> list[_Structure]:
    """BI-RADS-style benign features: oval, circumscribed, parallel (wider than tall), a thin
    echogenic capsule; anechoic with posterior enhancement (cyst) or homogeneous and mildly
    hypoechoic (fibroadenoma-like)."""
    ax, angle = r * _u(rng, 1.1, 1.8), _angle(rng, 20)
    capsule = _u(rng, -8, -3) if rng.random() < 0.7 else None
    if rng.random() < 0.35:
        return [_fluid_blob(x, z, ax, r, angle, edge=0.01, rim_db=capsule, lesion=True)]
    return [
        _Blob(x, z, ax, r, _u(rng, -18, -8), _u(rng, 5, 11), angle, edge=0.012,
              wobble=_u(rng, 0.0, 0.08), lobes=int(rng.integers(2, 5)), phase=_phase(rng),
              rim_db=capsule, lesion=True)
    ]  # fmt: skip


def _malignant_like(rng: np.random.Generator, x: float, z: float, r: float) -> list[_Structure]:
    """BI-RADS-style suspicious features: irregular, spiculated, not parallel (often taller
    than wide), markedly hypoechoic with posterior shadowing, an echogenic halo at times, and
    microcalcifications inside."""
    ax, az = r * _u(rng, 0.8, 1.2), r * _u(rng, 0.9, 1.5)
    halo = _u(rng, -8, -4) if rng.random() < 0.4 else None
    parts: list[_Structure] = [
        _Blob(x, z, ax, az, _u(rng, -24, -12), _u(rng, 10, 24), _angle(rng, 35), edge=0.007,
              wobble=_u(rng, 0.08, 0.3), lobes=int(rng.integers(5, 12)), phase=_phase(rng),
              rim_db=halo, rim_width=0.012, lesion=True)
    ]  # fmt: skip
    for _ in range(int(rng.integers(0, 4))):
        cx, cz = x + _u(rng, -0.5, 0.5) * ax, z + _u(rng, -0.5, 0.5) * az
        size = _u(rng, 0.004, 0.007)
        parts.append(_Blob(cx, cz, size, size, _u(rng, 4, 8), 20.0, edge=0.003, lesion=True))
    return parts


LESION_CLASSES: tuple[str, ...] = ("benign", "malignant")
LESION_RADIUS = (0.08, 0.15)  # image heights


def _breast_lesion_case(rng: np.random.Generator, f: _Frame, malignant: bool) -> _Scene:
    """Breast tissue with exactly one lesion of the given class (the downstream tasks)."""
    parts, (skin, fat, gland) = _breast_tissue(rng, f)
    z = skin + fat + _u(rng, 0.3, 0.7) * gland
    x, r = f.lateral(rng, z, 0.5), _u(rng, *LESION_RADIUS)
    parts += (_malignant_like if malignant else _benign_like)(rng, x, z, r)
    return _breast_scene(rng, parts, skin)


def _heart(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Apical four-chamber-like view: myocardium, blood-filled chambers, valves, pericardium."""
    cz = _u(rng, 0.45, 0.55)
    cx = f.lateral(rng, cz, 0.15)
    rot = _angle(rng, 15)
    parts: list[_Structure] = [
        _Blob(
            x=cx,
            z=cz,
            ax=_u(rng, 0.26, 0.34),
            az=_u(rng, 0.4, 0.46),
            echo_db=_u(rng, -9, -6),
            att=6.0,
            angle=rot,
            rim_db=_u(rng, 2, 6),  # pericardium
            rim_width=0.012,
            edge=0.02,
        ),
    ]
    septum = _u(rng, 0.025, 0.04)
    for side in (-1.0, 1.0):
        if rng.random() < 0.85:  # ventricle, converging towards the apex
            ax, az = _u(rng, 0.07, 0.11), _u(rng, 0.16, 0.22)
            vx, vz = _offset(cx, cz, rot, side * (septum + ax), -0.05 - 0.6 * az)
            tilt = side * (0.15 + _angle(rng, 12))
            parts.append(_fluid_blob(vx, vz, ax, az, rot - tilt, edge=0.02))
        if rng.random() < 0.75:  # atrium
            ax, az = _u(rng, 0.06, 0.1), _u(rng, 0.07, 0.1)
            atx, atz = _offset(cx, cz, rot, side * (septum + ax), 0.05 + az)
            parts.append(_fluid_blob(atx, atz, ax, az, rot, edge=0.02))
        lx, lz = _offset(cx, cz, rot, side * (septum + 0.05), _u(rng, -0.03, 0.03))
        leaflet_angle = rot + _angle(rng, 25)
        parts.append(_Blob(lx, lz, 0.045, 0.006, 0.0, 6.0, leaflet_angle, edge=0.006))
    return _Scene(_u(rng, -16, -12), _u(rng, 4, 7), _u(rng, 0.5, 2.0), tuple(parts))


def _fetal(rng: np.random.Generator, f: _Frame) -> _Scene:
    """Amniotic fluid, placenta, fetal head (skull ring, midline) or body (shadowing spine)."""
    fz = _u(rng, 0.48, 0.58)
    fx = f.lateral(rng, fz, 0.1)
    fax, faz = _u(rng, 0.4, 0.6), _u(rng, 0.28, 0.36)
    parts: list[_Structure] = [_fluid_blob(fx, fz, fax, faz, _angle(rng, 10), edge=0.03)]
    if rng.random() < 0.6:  # placenta along the anterior wall
        depth, thickness = _u(rng, 0.1, 0.16), _u(rng, 0.08, 0.14)
        wave = dict(wave=0.015, freq=_u(rng, 3, 8), phase=_phase(rng))
        parts.append(_Layer(depth, thickness, _u(rng, -6, -2), 7.0, **wave))
    z = fz + _u(rng, -0.02, 0.08)
    x = f.lateral(rng, z, 0.2)
    angle = _angle(rng, 30)
    if rng.random() < 0.6:  # head: brain, bright shadowing skull ring, midline echo
        a = _u(rng, 0.14, 0.2)
        b = a * _u(rng, 0.75, 0.9)
        parts += [
            _Blob(
                x=x,
                z=z,
                ax=a,
                az=b,
                echo_db=_u(rng, -20, -16),
                att=5.0,
                angle=angle,
                rim_db=_u(rng, 8, 12),
                rim_width=0.012,
                rim_att=_u(rng, 20, 40),
            ),
            _Blob(x, z, 0.8 * a, 0.008, -2.0, 6.0, angle, edge=0.005),
        ]
    else:  # trunk with a row of vertebrae
        a, b = _u(rng, 0.18, 0.26), _u(rng, 0.1, 0.14)
        parts.append(_Blob(x, z, a, b, _u(rng, -12, -8), 7.0, angle, rim_db=-2.0, edge=0.02))
        for k in range(-3, 4):
            vx, vz = _offset(x, z, angle, k * 0.22 * a, 0.55 * b)
            parts.append(_calcification(vx, vz, 0.016, 6.0))
    parts += _body_wall(rng, thin=True)
    return _Scene(_u(rng, -10, -6), _u(rng, 5, 8), _u(rng, 0.5, 2.0), tuple(parts))


# Per organ: recipe and probability of each geometry in GEOMETRIES order.
_RECIPES = (
    (_liver, (0.15, 0.15, 0.7)),
    (_kidney, (0.1, 0.1, 0.8)),
    (_thyroid, (0.9, 0.0, 0.1)),
    (_breast, (0.9, 0.0, 0.1)),
    (_heart, (0.0, 1.0, 0.0)),
    (_fetal, (0.0, 0.15, 0.85)),
)
assert len(_RECIPES) == len(ORGANS)


# ----------------------------------------------------------------------------------------
# Rendering
# ----------------------------------------------------------------------------------------


def _tissue(
    scene: _Scene, c: _Coords, shape: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Diffuse backscatter power, specular (coherent) reflection power and attenuation."""
    db = np.full(shape, scene.background_db, np.float32)
    att = np.full(shape, scene.attenuation, np.float32)
    specular = np.zeros(shape, np.float32)
    for s in scene.structures:
        m, dist = s.field(c)
        db += m * (s.echo_db - db)
        att += m * (s.att - att)
        specular *= 1.0 - m
        if s.rim_db is not None:
            rim = np.exp(-np.square(dist * (1.0 / s.rim_width)))
            specular += np.float32(10.0 ** (s.rim_db / 10)) * rim
            if s.rim_att:
                att += s.rim_att * rim
    return np.exp(db * np.float32(math.log(10) / 10)), specular, att


def _regions(scene: _Scene, c: _Coords, shape: tuple[int, int]) -> np.ndarray:
    """int16 map: 0 for background tissue, k for the k-th structure painted on top."""
    region = np.zeros(shape, np.int16)
    for k, s in enumerate(scene.structures, start=1):
        region[np.broadcast_to(s.field(c)[0] > 0.5, shape)] = k
    return region


def _gauss_energy(sigma: float) -> float:
    """Sum of squared weights of scipy's normalised 1-D Gaussian kernel (white-noise gain)."""
    radius = int(PSF_TRUNCATE * sigma + 0.5)
    k = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    k /= k.sum()
    return float(np.sum(k * k))


def _render(
    seed: int, index: int, h: int, w: int, organ: int, labels: bool, lesion: bool | None = None
) -> dict[str, Any]:
    """Simulate one image (and, with ``labels``, its ground-truth maps); arguments validated.
    ``lesion`` (True: malignant-like, False: benign-like) renders a breast lesion case instead
    of the organ's recipe, from its own random stream."""
    if lesion is None:
        stream = [seed, index, _IMAGE_STREAM, organ]
    else:
        stream, organ = [seed, index, _LESION_STREAM, int(lesion)], ORGANS.index("breast")
    scene_seq, speckle_seq = np.random.SeedSequence(stream).spawn(2)
    rng = np.random.default_rng(scene_seq)
    recipe, weights = _RECIPES[organ]
    frame = _draw_frame(rng, weights, h, w)
    scene = recipe(rng, frame) if lesion is None else _breast_lesion_case(rng, frame, lesion)
    tgc = _u(rng, *TGC_FRACTION) * scene.attenuation
    dyn_range = _u(rng, *DYNAMIC_RANGE_DB)
    top_db = DISPLAY_TOP_DB + _u(rng, -GAIN_JITTER_DB, GAIN_JITTER_DB)
    sigma_axial = _u(rng, *PSF_AXIAL_SIGMA)
    sigma_lateral = _u(rng, *PSF_LATERAL_SIGMA)
    tex_k = (_u(rng, *TEXTURE_WAVENUMBER), _u(rng, *TEXTURE_WAVENUMBER))
    tex_phase = (_u(rng, 0, 2 * math.pi), _u(rng, 0, 2 * math.pi))

    # Beam grid (depth x beam) and its Cartesian sample positions.
    x_img, z_img = _image_coords(h, w)
    if frame.geometry == "linear":
        coords = _Coords(x_img, z_img, z_img)
        depth, lateral = z_img, x_img
        dr, lateral_step = 1.0 / h, 1.0 / h
        beam_gain = np.float32(1.0)
    else:
        dr = (frame.r_max - frame.r_min) / h
        d_theta = 2 * frame.half_angle / w
        depth = ((np.arange(h, dtype=np.float32) + 0.5) * dr)[:, None]
        theta = ((np.arange(w, dtype=np.float32) + 0.5) * d_theta - frame.half_angle)[None, :]
        r = depth + np.float32(frame.r_min)
        coords = _Coords(r * np.sin(theta), frame.apex_z + r * np.cos(theta), depth)
        lateral_step = 0.5 * (frame.r_min + frame.r_max) * d_theta  # beam spacing at mid depth
        lateral = theta * np.float32(lateral_step / d_theta)
        beam_gain = 1.0 - FAN_EDGE_LOSS * (theta * np.float32(1 / frame.half_angle)) ** 4

    power, specular, att = _tissue(scene, coords, (h, w))
    # Slow echogenicity variation, in nepers of intensity.
    texture = np.float32(scene.texture_db * math.log(10) / 10) * (
        np.cos(tex_k[0] * lateral + tex_phase[0]) * np.cos(tex_k[1] * depth + tex_phase[1])
    )
    # Two-way attenuation along each beam down to the middle of each sample (midpoint rule).
    loss = (np.cumsum(att, axis=0) - 0.5 * att) * np.float32(dr)
    gain = np.exp(tgc * depth - loss + texture) * beam_gain
    power *= gain
    power += np.float32(10 ** (NOISE_FLOOR_DB / 10))

    # Speckle: complex Gaussian scatterers plus coherent specular reflections, blurred by the
    # (baseband) PSF.
    sig_r = max(sigma_axial / dr, PSF_MIN_SIGMA_PX[0])
    sig_l = max(sigma_lateral / lateral_step, PSF_MIN_SIGMA_PX[1])
    speckle_rng = np.random.default_rng(speckle_seq)
    iq = speckle_rng.standard_normal((2, h, w), dtype=np.float32)
    iq *= np.sqrt(power * np.float32(0.5 / (_gauss_energy(sig_r) * _gauss_energy(sig_l))))
    iq[0] += np.sqrt(specular * gain)
    ndimage.gaussian_filter(iq, (0, sig_r, sig_l), output=iq, truncate=PSF_TRUNCATE)
    intensity = iq[0] * iq[0] + iq[1] * iq[1] + np.float32(_TINY)
    scale = 255.0 / dyn_range

    if frame.geometry == "linear":
        fan = np.ones((h, w), bool)
    else:
        r_img, th_img = _polar(frame, x_img, z_img)
        fan = _fan_mask(frame, r_img, th_img)
        rows = (r_img - np.float32(frame.r_min)) * np.float32(1 / dr) - 0.5
        cols = (th_img + np.float32(frame.half_angle)) * np.float32(1 / d_theta) - 0.5

    def display(intensity: np.ndarray, top_db: float) -> np.ndarray:
        """Log compression, the scanner's smoothing, scan conversion, uint8."""
        img = np.log10(intensity) * np.float32(10 * scale) + np.float32(
            (dyn_range - top_db) * scale
        )
        ndimage.gaussian_filter(img, VIDEO_SMOOTH_PX, output=img, truncate=2.0)
        if frame.geometry != "linear":  # sample the beam grid at every pixel, blank outside
            img = ndimage.map_coordinates(img, (rows, cols), order=1, mode="nearest")
            img *= fan
        return (np.clip(img, 0.0, 255.0) + 0.5).astype(np.uint8)

    out = {"image": display(intensity, top_db), "organ": organ}
    if labels:
        # The speckle-free image: the expected intensity of the blurred field (the squared PSF
        # is a Gaussian narrower by sqrt(2)), shown as the mean of the speckled log image.
        mean = ndimage.gaussian_filter(
            power, (sig_r / math.sqrt(2), sig_l / math.sqrt(2)), truncate=PSF_TRUNCATE
        )
        coherent = ndimage.gaussian_filter(
            np.sqrt(specular * gain), (sig_r, sig_l), truncate=PSF_TRUNCATE
        )
        mean += coherent * coherent + np.float32(_TINY)
        out["clean"] = display(mean, top_db + SPECKLE_LOG_BIAS_DB)
        if frame.geometry == "linear":
            img_coords = coords
        else:
            img_coords = _Coords(x_img, z_img, r_img - np.float32(frame.r_min))
        region = _regions(scene, img_coords, (h, w))
        fluid = np.array([False] + [s.fluid for s in scene.structures])
        lesion_parts = np.array([False] + [s.lesion for s in scene.structures])
        out["fan_mask"] = fan
        out["cyst_mask"] = fluid[region] & fan
        out["lesion_mask"] = lesion_parts[region] & fan
        out["region"] = np.where(fan, region, np.int16(-1))
        out["geometry"] = frame.geometry
    return out


# ----------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------


def _check_size(image_size: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(image_size, int | np.integer):
        image_size = (image_size, image_size)
    if isinstance(image_size, str) or not isinstance(image_size, Sequence) or len(image_size) != 2:
        raise ValueError(f"image_size must be an int or an (H, W) pair, got {image_size!r}")
    size = (operator.index(image_size[0]), operator.index(image_size[1]))
    if min(size) < MIN_IMAGE_SIDE:
        raise ValueError(f"image_size sides must be at least {MIN_IMAGE_SIDE} px, got {size}")
    return size


def _check_organ(organ: int) -> int:
    organ = operator.index(organ)
    if not 0 <= organ < len(ORGANS):
        raise ValueError(f"organ id must be in [0, {len(ORGANS)}) {ORGANS}, got {organ}")
    return organ


def _check_seed_index(seed: int, index: int) -> tuple[int, int]:
    seed, index = operator.index(seed), operator.index(index)
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be non-negative, got seed={seed}, index={index}")
    return seed, index


def _draw_organ(seed: int, index: int, choices: Sequence[int]) -> int:
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, _ORGAN_STREAM]))
    return choices[int(rng.integers(len(choices)))]


def generate_with_labels(
    seed: int, index: int, image_size: int | tuple[int, int], organ: int | None = None
) -> dict[str, Any]:
    """``generate`` plus ground truth, for tests and analysis.

    Returns a dict with ``image`` (uint8 [H, W]), ``organ`` (int), ``geometry`` (one of
    ``GEOMETRIES``), ``fan_mask`` (bool [H, W], the imaged field), ``cyst_mask`` (bool [H, W],
    anechoic fluid: cysts, vessels, chambers, amniotic fluid), ``lesion_mask`` (bool [H, W],
    focal lesions: nodules, masses, lesion cysts), ``region`` (int16 [H, W]: -1 outside the
    fan, 0 background tissue, k >= 1 the k-th structure of the recipe) and ``clean`` (uint8
    [H, W], the same scene without speckle: the local mean of the log-compressed image).
    The image is identical to ``generate``'s.
    """
    h, w = _check_size(image_size)
    seed, index = _check_seed_index(seed, index)
    if organ is None:
        organ = _draw_organ(seed, index, range(len(ORGANS)))
    return _render(seed, index, h, w, _check_organ(organ), labels=True)


def lesion_class(seed: int, index: int) -> int:
    """The class of lesion case ``index`` (an index into ``LESION_CLASSES``), drawn from
    (seed, index) with equal probabilities and without rendering anything."""
    seed, index = _check_seed_index(seed, index)
    rng = np.random.default_rng(np.random.SeedSequence([seed, index, _LESION_CLASS_STREAM]))
    return int(rng.integers(len(LESION_CLASSES)))


def generate_lesion_case(
    seed: int, index: int, image_size: int | tuple[int, int], label: int | None = None
) -> dict[str, Any]:
    """A breast image with exactly one lesion, for the downstream tasks: the fields of
    ``generate_with_labels`` plus ``label`` (0 benign-like: oval, circumscribed, parallel,
    anechoic or homogeneous; 1 malignant-like: irregular, spiculated, taller than wide,
    shadowing, microcalcifications). ``label=None`` takes ``lesion_class(seed, index)``.

    Deterministic in (seed, index, image_size, label) and independent of the pre-training
    images of the same seed (another random stream).
    """
    h, w = _check_size(image_size)
    seed, index = _check_seed_index(seed, index)
    label = lesion_class(seed, index) if label is None else operator.index(label)
    if label not in range(len(LESION_CLASSES)):
        raise ValueError(f"label must be in [0, {len(LESION_CLASSES)}) {LESION_CLASSES}")
    out = _render(seed, index, h, w, ORGANS.index("breast"), labels=True, lesion=bool(label))
    return {**out, "label": label}


def generate(
    seed: int, index: int, image_size: int | tuple[int, int], organ: int | None = None
) -> tuple[np.ndarray, int]:
    """One synthetic B-mode image: (uint8 [H, W], organ id).

    Deterministic in (seed, index, image_size, organ). ``organ=None`` draws the organ id from
    (seed, index); passing that id explicitly yields the same image.
    """
    h, w = _check_size(image_size)
    seed, index = _check_seed_index(seed, index)
    if organ is None:
        organ = _draw_organ(seed, index, range(len(ORGANS)))
    out = _render(seed, index, h, w, _check_organ(organ), labels=False)
    return out["image"], out["organ"]


class SyntheticUltrasound:
    """A grain-compatible random-access data source of ``num_images`` synthetic images.

    Item ``i`` is ``{"image": uint8 [H, W, 1], "organ": int32 []}``, generated on the fly by
    ``generate(seed, i, image_size, organ)`` with the organ drawn from (seed, i) among
    ``organs`` (default: all of ``ORGANS``), so any worker reproduces any item.
    """

    def __init__(
        self,
        num_images: int,
        image_size: int | tuple[int, int],
        seed: int = 0,
        organs: Sequence[int] | None = None,
    ):
        num_images = operator.index(num_images)
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        self.num_images = num_images
        self.image_size = _check_size(image_size)
        self.seed = _check_seed_index(seed, 0)[0]
        if organs is None:
            organs = range(len(ORGANS))
        self.organs = tuple(_check_organ(o) for o in organs)
        if not self.organs:
            raise ValueError("organs must not be empty")

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = operator.index(index)
        if not -self.num_images <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} images")
        index %= self.num_images
        organ = _draw_organ(self.seed, index, self.organs)
        image, organ = generate(self.seed, index, self.image_size, organ)
        return {"image": image[..., None], "organ": np.asarray(organ, np.int32)}

    def __repr__(self) -> str:
        return (
            f"SyntheticUltrasound(num_images={self.num_images}, image_size={self.image_size}, "
            f"seed={self.seed}, organs={self.organs})"
        )
