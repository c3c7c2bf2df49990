"""Identities of the synthetic face dataset: the latent face of each identity, drawn from its seed.

An identity is a vector of latent parameters (face shape, skin tone, eyes, brows, nose, mouth, hair,
facial hair, marks, skin pattern) drawn from the random stream ``(seed, IDENTITY, identity)``; the
draws are named (`IdentityDraws`), and so are the draws of one rendered instance (`InstanceDraws`).
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass

import numpy as np

# Random-stream tags: identity latents, training/probe instances, verification instances.
_IDENTITY, _INSTANCE, _VAL_INSTANCE, _COUNTS, _PAIRS = 11, 12, 13, 14, 15

_HAIR_COLOURS = np.array([
    (20, 16, 14), (45, 30, 22), (80, 52, 32), (120, 80, 45), (165, 120, 70), (210, 170, 110),
    (150, 60, 30), (110, 108, 105), (190, 188, 182), (60, 40, 60),
], dtype=np.float32)
_IRIS_COLOURS = np.array([
    (60, 35, 20), (95, 60, 30), (70, 110, 150), (80, 120, 70), (120, 120, 125), (40, 30, 25),
], dtype=np.float32)
_SKIN_DARK = np.array([70, 45, 30], dtype=np.float32)
_SKIN_LIGHT = np.array([245, 212, 188], dtype=np.float32)


def _col(rgb, k: float = 1.0) -> tuple:
    """An RGB triple of ints in 0..255 (what ImageDraw wants), optionally scaled."""
    return tuple(min(255, max(0, int(v * k))) for v in rgb)


# The uniform draws behind an identity and behind one rendered instance, by name. Their order is
# the order of the random stream: reordering (or inserting before the end) changes every image.
IdentityDraws = namedtuple("IdentityDraws", [
    "skin_tone", "skin_warmth", "skin_tint", "hair_colour", "hair_shade", "iris_colour", "iris_shade", "lip_red",
    "face_w", "face_h", "jaw", "face_y", "eye_y", "eye_dx", "eye_w", "eye_h", "eye_tilt", "brow_gap", "brow_len",
    "brow_thick", "brow_tilt", "brow_shade", "nose_len", "nose_w", "nose_shade", "mouth_y", "mouth_w", "lip_h",
    "hair_style", "hairline", "hair_volume", "hair_wave", "beard_style", "beard", "ear_size", "cheek", "cheek_size",
    "pattern_kind", "pattern", "pattern_shade",
])
InstanceDraws = namedtuple("InstanceDraws", [  # spare_*: drawn, unused (kept so the stream stays put)
    "rotation", "scale", "shift_x", "shift_y", "yaw", "pitch", "smile", "mouth_open", "brow_raise", "squint",
    "hair_jitter", "stubble", "glasses", "glasses_dark", "glasses_tone", "glasses_tone2", "mask", "mask_tone",
    "mask_tone2", "spare_19", "patch", "blur", "brightness", "contrast", "light_direction", "light_level", "cast_r",
    "cast_g", "cast_b", "noise", "noise_level", "noise_x", "noise_y", "spare_33", "spare_34", "spare_35",
    "spare_36", "spare_37", "spare_38", "spare_39", "background_r", "background_g", "background_b", "clutter",
    "spare_44", "spare_45", "spare_46", "spare_47", "spare_48", "spare_49", "spare_50", "spare_51", "spare_52",
    "spare_53", "spare_54", "spare_55", "spare_56", "spare_57", "spare_58", "spare_59", "spare_60", "spare_61",
    "spare_62", "spare_63",
])


# --------------------------------------------------------------------------- identity latents
@dataclass(frozen=True)
class Identity:
    """Latent face parameters of one identity (canvas units: the image spans [-0.5, 0.5])."""

    face_w: float
    face_h: float
    jaw: float
    face_y: float
    skin: tuple
    eye_y: float
    eye_dx: float
    eye_w: float
    eye_h: float
    eye_tilt: float
    iris: tuple
    brow_gap: float
    brow_len: float
    brow_thick: float
    brow_tilt: float
    brow_colour: tuple
    nose_len: float
    nose_w: float
    nose_colour: tuple
    mouth_y: float
    mouth_w: float
    lip_h: float
    lip_colour: tuple
    hair_colour: tuple
    hair_style: int
    hairline: float
    hair_volume: float
    hair_wave: float
    beard: int
    ear_size: float
    marks: tuple
    pattern: int
    pattern_dots: tuple
    pattern_colour: tuple
    cheek: tuple
    cheek_colour: tuple
    neck_colour: tuple
    ear_colour: tuple
    nostril_colour: tuple


def identity_params(seed: int, identity: int) -> Identity:
    """Draw the latent face of ``identity`` (independent of profile, size and format)."""
    r = np.random.default_rng([seed, _IDENTITY, identity])
    u = IdentityDraws(*r.random(len(IdentityDraws._fields)).tolist())
    tone = u.skin_tone ** 0.9
    skin = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * tone
    skin = skin + (u.skin_warmth - 0.5) * np.array([30, 8, -24]) + (u.skin_tint - 0.5) * np.array([-12, 18, 10])
    hair = _HAIR_COLOURS[int(u.hair_colour * len(_HAIR_COLOURS))] * (0.8 + 0.4 * u.hair_shade)
    iris = _IRIS_COLOURS[int(u.iris_colour * len(_IRIS_COLOURS))] * (0.8 + 0.4 * u.iris_shade)
    lip = skin * np.array([0.85, 0.55, 0.55]) + np.array([40, 0, 5]) * u.lip_red
    n_marks = int(r.integers(0, 3))
    marks = tuple(
        (float(r.uniform(-0.18, 0.18)), float(r.uniform(-0.12, 0.22)), float(r.uniform(0.012, 0.024)))
        for _ in range(n_marks)
    )
    # skin pattern: none, freckles, forehead lines, eye shadows, a scar (fixed per identity)
    pattern = int(u.pattern_kind * 8) if u.pattern < 0.6 else 0
    pattern = min(pattern, 4)
    dots = tuple((float(x), float(y)) for x, y in zip(r.uniform(-0.16, 0.16, 10), r.uniform(0.0, 0.1, 10)))
    return Identity(
        face_w=0.22 + 0.08 * u.face_w,
        face_h=0.29 + 0.08 * u.face_h,
        jaw=0.1 + 0.5 * u.jaw,
        face_y=0.0 + 0.04 * (u.face_y - 0.5),
        skin=_col(skin),
        eye_y=-0.09 + 0.07 * u.eye_y,
        eye_dx=0.08 + 0.05 * u.eye_dx,
        eye_w=0.036 + 0.026 * u.eye_w,
        eye_h=0.014 + 0.014 * u.eye_h,
        eye_tilt=(u.eye_tilt - 0.5) * 0.03,
        iris=_col(iris),
        brow_gap=0.03 + 0.035 * u.brow_gap,
        brow_len=0.05 + 0.05 * u.brow_len,
        brow_thick=0.008 + 0.02 * u.brow_thick,
        brow_tilt=(u.brow_tilt - 0.5) * 0.05,
        brow_colour=_col(hair * (0.6 + 0.3 * u.brow_shade)),
        nose_len=0.07 + 0.07 * u.nose_len,
        nose_w=0.025 + 0.03 * u.nose_w,
        nose_colour=_col(skin * (0.72 + 0.12 * u.nose_shade)),
        mouth_y=0.13 + 0.07 * u.mouth_y,
        mouth_w=0.06 + 0.06 * u.mouth_w,
        lip_h=0.008 + 0.018 * u.lip_h,
        lip_colour=_col(lip),
        hair_colour=_col(hair),
        hair_style=int(u.hair_style * 6),
        hairline=-0.12 - 0.12 * u.hairline,
        hair_volume=0.02 + 0.07 * u.hair_volume,
        hair_wave=u.hair_wave,
        beard=int(u.beard_style * 8) if u.beard < 0.45 else 0,
        ear_size=0.03 + 0.025 * u.ear_size,
        marks=marks,
        pattern=pattern,
        pattern_dots=dots,
        pattern_colour=_col(skin, 0.6 + 0.25 * u.pattern_shade),
        cheek=(0.0 if u.cheek < 0.5 else 0.03 + 0.04 * u.cheek_size,),
        cheek_colour=_col(skin * np.array([1.05, 0.82, 0.82])),
        neck_colour=_col(skin, 0.9),
        ear_colour=_col(skin, 0.92),
        nostril_colour=_col(skin, 0.55),
    )
