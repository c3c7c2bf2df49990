"""The embedded synthetic face dataset: long-tailed identities rendered as face-like images.

Real face sets cannot be downloaded here, yet DCQ needs data that behaves like faces where it
matters: many identities with few images, and nuisance variation (pose, light, expression,
occlusion, compression) large enough that raw pixels match poorly while a trained network learns the
identity. Each identity is a vector of latent parameters (face shape, skin tone, eyes, brows, nose,
mouth, hair, facial hair, marks); each image draws a fresh instance (pose, yaw, light, expression,
blur, noise, occluders, background, JPEG quality) and is drawn with PIL at the requested size.

Every image is a pure function of ``(seed, identity, instance)``, so output is identical for a seed
whatever the number of worker processes.
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from dcq.errors import DcqError

__all__ = ["PROFILES", "FaceRenderer", "identity_params", "images_per_identity", "synthesize"]

PROFILES = ("ms1m", "mf2")
GENERATOR_VERSION = 1

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
    u = r.random(40).tolist()
    tone = u[0] ** 0.9
    skin = _SKIN_DARK + (_SKIN_LIGHT - _SKIN_DARK) * tone
    skin = skin + (u[1] - 0.5) * np.array([30, 8, -24]) + (u[2] - 0.5) * np.array([-12, 18, 10])
    hair = _HAIR_COLOURS[int(u[3] * len(_HAIR_COLOURS))] * (0.8 + 0.4 * u[4])
    iris = _IRIS_COLOURS[int(u[5] * len(_IRIS_COLOURS))] * (0.8 + 0.4 * u[6])
    lip = skin * np.array([0.85, 0.55, 0.55]) + np.array([40, 0, 5]) * u[7]
    n_marks = int(r.integers(0, 3))
    marks = tuple(
        (float(r.uniform(-0.18, 0.18)), float(r.uniform(-0.12, 0.22)), float(r.uniform(0.012, 0.024)))
        for _ in range(n_marks)
    )
    # skin pattern: none, freckles, forehead lines, eye shadows, a scar (fixed per identity)
    pattern = int(u[37] * 8) if u[38] < 0.6 else 0
    pattern = min(pattern, 4)
    dots = tuple((float(x), float(y)) for x, y in zip(r.uniform(-0.16, 0.16, 10), r.uniform(0.0, 0.1, 10)))
    return Identity(
        face_w=0.22 + 0.08 * u[8],
        face_h=0.29 + 0.08 * u[9],
        jaw=0.1 + 0.5 * u[10],
        face_y=0.0 + 0.04 * (u[11] - 0.5),
        skin=_col(skin),
        eye_y=-0.09 + 0.07 * u[12],
        eye_dx=0.08 + 0.05 * u[13],
        eye_w=0.036 + 0.026 * u[14],
        eye_h=0.014 + 0.014 * u[15],
        eye_tilt=(u[16] - 0.5) * 0.03,
        iris=_col(iris),
        brow_gap=0.03 + 0.035 * u[17],
        brow_len=0.05 + 0.05 * u[18],
        brow_thick=0.008 + 0.02 * u[19],
        brow_tilt=(u[20] - 0.5) * 0.05,
        brow_colour=_col(hair * (0.6 + 0.3 * u[21])),
        nose_len=0.07 + 0.07 * u[22],
        nose_w=0.025 + 0.03 * u[23],
        nose_colour=_col(skin * (0.72 + 0.12 * u[24])),
        mouth_y=0.13 + 0.07 * u[25],
        mouth_w=0.06 + 0.06 * u[26],
        lip_h=0.008 + 0.018 * u[27],
        lip_colour=_col(lip),
        hair_colour=_col(hair),
        hair_style=int(u[28] * 6),
        hairline=-0.12 - 0.12 * u[29],
        hair_volume=0.02 + 0.07 * u[30],
        hair_wave=u[31],
        beard=int(u[32] * 8) if u[33] < 0.45 else 0,
        ear_size=0.03 + 0.025 * u[34],
        marks=marks,
        pattern=pattern,
        pattern_dots=dots,
        pattern_colour=_col(skin, 0.6 + 0.25 * u[39]),
        cheek=(0.0 if u[35] < 0.5 else 0.03 + 0.04 * u[36],),
        cheek_colour=_col(skin * np.array([1.05, 0.82, 0.82])),
        neck_colour=_col(skin, 0.9),
        ear_colour=_col(skin, 0.92),
        nostril_colour=_col(skin, 0.55),
    )


# --------------------------------------------------------------------------- rendering
_RAMP = np.arange(256, dtype=np.float32)[None, :]
_HEAD_T = np.linspace(0, 2 * math.pi, 32, endpoint=False)
_HEAD_SIN, _HEAD_COS = np.sin(_HEAD_T), np.cos(_HEAD_T)
_HEAD_TAPER = np.clip(_HEAD_SIN, 0, None) ** 2 * 0.55
_HAIR_T = np.linspace(math.pi, 2 * math.pi, 24)
_HAIR_COS, _HAIR_SIN = np.cos(_HAIR_T), np.sin(_HAIR_T)
_HAIR_X = np.linspace(1.02, -1.02, 12)
_XM = np.linspace(-1, 1, 9)
_BULGE = 1 - _XM ** 2


def _apply_lut(img: Image.Image, lut: list) -> Image.Image:
    """Image.point with an integer table; skips Pillow's per-entry round() (50 us of 600) when it can."""
    try:
        return img._new(img.im.point(lut, None))
    except (AttributeError, TypeError):  # pragma: no cover - other Pillow internals
        return img.point(lut)


class _Pen:
    """Collects shapes given in face coordinates and draws them through one affine map (the pose).

    Transforming the vertices instead of resampling a drawn image keeps edges sharp; doing it for
    all shapes in one matrix product keeps the per-shape cost to a few microseconds.
    """

    _UNIT: ClassVar[dict] = {n: np.stack([np.cos(t), np.sin(t)], 1)
                             for n in (12, 16, 24) for t in [np.linspace(0, 2 * math.pi, n, endpoint=False)]}

    def __init__(self, draw: ImageDraw.ImageDraw, m: np.ndarray, t: np.ndarray, px: float):
        self.d, self.m, self.t, self.px = draw, m, t, px
        self._pts: list[np.ndarray] = []
        self._ops: list[tuple] = []

    def poly(self, pts, fill) -> None:
        pts = np.asarray(pts, dtype=np.float64)
        self._pts.append(pts)
        self._ops.append(("poly", len(pts), fill, 0))

    def ellipse(self, cx, cy, rx, ry, fill=None, n=16, outline=None, width=1.0) -> None:
        pts = self._UNIT[n] * (rx, ry) + (cx, cy)
        if outline is None:
            self.poly(pts, fill)
        else:
            self.line(np.concatenate([pts, pts[:1]]), outline, width)

    def line(self, pts, fill, width) -> None:
        pts = np.asarray(pts, dtype=np.float64)
        self._pts.append(pts)
        self._ops.append(("line", len(pts), fill, max(1, round(width * self.px))))

    def flush(self) -> None:
        """Draw everything collected, in order."""
        if not self._ops:
            return
        flat = (np.concatenate(self._pts) @ self.m + self.t).ravel().tolist()
        pos = 0
        d = self.d
        for kind, n, fill, width in self._ops:
            xy = flat[pos:pos + 2 * n]
            pos += 2 * n
            if kind == "poly":
                d.polygon(xy, fill=fill)
            else:
                d.line(xy, fill=fill, width=width, joint="curve")
        self._pts.clear()
        self._ops.clear()


class FaceRenderer:
    """Draws identity instances at one image size; caches per-size light and noise banks.

    Sizes up to 72 px are drawn at 2x and box-reduced, so small features (eyes, brows) stay
    visible and edges are anti-aliased at the CPU demo's 32-48 px.
    """

    N_LIGHT_DIRS = 16
    NOISE_LEVELS = (2.0, 4.0, 7.0, 10.0)

    def __init__(self, image_size: int = 112):
        self.size = S = int(image_size)
        if S < 16:
            raise DcqError(f"image_size {S} is too small to draw a face; use 16 or more")
        self.ss = 2 if S <= 72 else 1
        self.canvas = S * self.ss
        # light bank: directional ramps from 0 (dark side) to 255, one per direction
        g = (np.arange(S, dtype=np.float32) + 0.5) / S * 2 - 1
        gx, gy = np.meshgrid(g, g)
        self._ramps = []
        for k in range(self.N_LIGHT_DIRS):
            th = 2 * math.pi * k / self.N_LIGHT_DIRS
            ramp = (math.cos(th) * gx + math.sin(th) * gy) / math.sqrt(2)  # [-1, 1]
            self._ramps.append(ramp)
        self._light_cache: dict = {}
        # noise bank: 128 + N(0, sigma) as RGB images, cropped at random offsets
        nr = np.random.default_rng(20210601)
        self._pad = 16
        base = nr.standard_normal((S + self._pad, S + self._pad, 3)).astype(np.float32)
        self._noise = [Image.fromarray(np.clip(128 + base * s, 0, 255).astype(np.uint8)) for s in self.NOISE_LEVELS]

    def _light(self, direction: int, level: int) -> Image.Image:
        """Multiplicative light field in [1 - strength, 1] as an RGB image (cached, 16 x 6 of them)."""
        key = (direction, level)
        im = self._light_cache.get(key)
        if im is None:
            strength = 0.12 * (level + 1)
            field = 1 - strength * (1 - self._ramps[direction]) / 2
            arr = np.clip(field * 255, 0, 255).astype(np.uint8)
            im = Image.fromarray(np.repeat(arr[:, :, None], 3, axis=2))
            self._light_cache[key] = im
        return im

    def render(self, ident: Identity, r: np.random.Generator) -> Image.Image:
        """One instance of ``ident`` as an RGB PIL image of image_size x image_size."""
        u = r.random(64).tolist()
        S, C = self.size, self.canvas
        # ---- background: colour plus a few clutter shapes (not posed)
        img = Image.new("RGB", (C, C), tuple(int(255 * v) for v in u[40:43]))
        d = ImageDraw.Draw(img)
        for j in range(int(u[43] * 4)):
            v = r.random(7)
            x0, y0 = (v[3] - 0.3) * C, (v[4] - 0.3) * C
            box = (x0, y0, x0 + C * (0.2 + 0.6 * v[5]), y0 + C * (0.2 + 0.6 * v[6]))
            (d.ellipse if j % 2 else d.rectangle)(box, fill=tuple(int(x) for x in v[:3] * 255))

        # ---- pose: rotation, scale, shift (applied to vertices) and yaw / pitch (moves features)
        ang = (u[0] * 2 - 1) * 0.25
        scale = 0.86 + 0.30 * u[1]
        tx, ty = (u[2] - 0.5) * 0.16, (u[3] - 0.5) * 0.16
        ca, sa = math.cos(ang) * scale * C, math.sin(ang) * scale * C
        pen = _Pen(d, np.array([[ca, sa], [-sa, ca]]), np.array([(0.5 + tx) * C, (0.5 + ty) * C]), scale * C)
        yaw = (u[4] * 2 - 1) * 0.75
        pitch = (u[5] * 2 - 1) * 0.5
        smile, mouth_open = u[6], max(0.0, u[7] * 1.6 - 0.6)
        brow_raise = (u[8] - 0.3) * 0.02
        squint = 0.6 + 0.6 * u[9]
        hair_jit = 0.85 + 0.3 * u[10]
        self._draw_face(pen, ident, yaw, pitch, smile, mouth_open, brow_raise, squint, hair_jit, u, r)
        pen.flush()

        # ---- a random patch anywhere (hand, microphone, caption), not posed
        if u[20] < 0.10:
            v = r.random(7)
            pw, ph = C * (0.12 + 0.18 * v[3]), C * (0.10 + 0.15 * v[4])
            x0, y0 = v[5] * (C - pw), v[6] * (C - ph)
            d.rectangle((x0, y0, x0 + pw, y0 + ph), fill=tuple(int(x) for x in v[:3] * 255))
        if self.ss > 1:
            img = img.reduce(self.ss)

        # ---- blur
        blur = u[21] ** 2 * 1.4 * S / 112
        if blur > 0.3:
            img = img.filter(ImageFilter.BoxBlur(blur))
        # ---- exposure, contrast, colour cast as one per-channel lookup table
        bright = 0.8 + 0.45 * u[22]
        contrast = 0.75 + 0.45 * u[23]
        level = int(u[25] * 6)
        lift = 1.0 / (1 - 0.12 * (level + 1) / 2)  # keep mean brightness under the light field
        gain = bright * lift * (1 + (np.array(u[26:29], dtype=np.float32)[:, None] - 0.5) * 0.2)
        lut = np.clip(((_RAMP - 128) * contrast + 128) * gain + 0.5, 0, 255).astype(np.uint8).ravel().tolist()
        img = _apply_lut(img, lut)
        # ---- directional light, then sensor noise
        img = ImageChops.multiply(img, self._light(int(u[24] * self.N_LIGHT_DIRS), level))
        if u[29] < 0.75:
            k = int(u[30] * len(self.NOISE_LEVELS))
            ox, oy = int(u[31] * self._pad), int(u[32] * self._pad)
            img = ImageChops.add(img, self._noise[k].crop((ox, oy, ox + S, oy + S)), 1.0, -128)
        return img

    def _draw_face(self, pen: _Pen, ident: Identity, yaw, pitch, smile, mouth_open, brow_raise, squint,
                   hair_jit, u, r) -> None:
        fy, fw, fh = ident.face_y, ident.face_w, ident.face_h
        shift = yaw * fw * 0.35  # features move towards the turned side
        vshift = pitch * 0.03
        near = 1.0 - 0.45 * abs(yaw)  # the far eye / brow narrows
        skin, hair = ident.skin, ident.hair_colour
        # shoulders and neck
        body = tuple(int(v) for v in r.integers(20, 230, 3))
        pen.poly([[-0.6, 0.7], [-0.42, fy + fh + 0.12], [-0.12, fy + fh - 0.02], [0.12, fy + fh - 0.02],
                  [0.42, fy + fh + 0.12], [0.6, 0.7]], body)
        pen.poly([[-0.08, fy + fh - 0.1], [0.08, fy + fh - 0.1], [0.09, fy + fh + 0.06], [-0.09, fy + fh + 0.06]],
                 ident.neck_colour)
        # long hair behind the head
        if ident.hair_style in (2, 4):
            vol = ident.hair_volume * hair_jit
            pen.ellipse(-shift * 0.3, fy + 0.06, fw + vol + 0.02, fh + 0.1, hair, n=24)
        # ears (the far one hides behind the head when turned)
        for side in (-1, 1):
            vis = 1.0 - max(0.0, side * yaw) * 1.2
            if vis > 0.15:
                pen.ellipse(side * (fw - 0.01) - shift * 0.5, fy + ident.eye_y + 0.04 + vshift,
                            ident.ear_size * 0.6 * vis, ident.ear_size, ident.ear_colour, n=12)
        # head: ellipse whose lower half tapers to the jaw, narrowed by yaw
        sin_t = _HEAD_SIN
        xs = (fw * (1 - 0.12 * abs(yaw))) * _HEAD_COS * (1 - ident.jaw * _HEAD_TAPER) - shift * 0.25
        ys = fh * sin_t + fy
        pen.poly(np.stack([xs, ys], 1), skin)
        if ident.cheek[0] > 0:
            cc = ident.cheek_colour
            for side in (-1, 1):
                w = ident.cheek[0] * (near if side * yaw > 0 else 1.0)
                pen.ellipse(side * (ident.eye_dx + 0.02) + shift, fy + 0.07 + vshift, w, w * 0.7, cc, n=12)
        # beard (following the jaw) and moustache
        mouth_y = fy + ident.mouth_y + vshift
        if ident.beard:
            if ident.beard <= 5:
                sel = sin_t > (0.45 if ident.beard <= 3 else 0.7)
                bx, by = xs[sel], ys[sel]
                top = mouth_y - 0.01
                pen.poly(np.concatenate([[[bx[-1] * 0.95, top]], np.stack([bx, by], 1), [[bx[0] * 0.95, top]]]), hair)
            if ident.beard in (1, 3, 5, 6, 7):
                my = mouth_y - ident.lip_h - 0.012
                mw = ident.mouth_w * (0.6 if ident.beard == 7 else 1.0)
                pen.poly([[-mw + shift, my + 0.008], [shift, my - 0.012], [mw + shift, my + 0.008],
                          [shift, my + 0.002]], hair)
        if ident.pattern:
            self._draw_pattern(pen, ident, yaw, shift, vshift)
        for mx, my, mr in ident.marks:
            if abs(mx) < fw * 0.8:
                pen.ellipse(mx * (1 - 0.1 * abs(yaw)) + shift, fy + my + vshift, mr, mr, (60, 40, 30), n=12)
        # eyes and brows
        ey = fy + ident.eye_y + vshift
        eye_pos = []
        for side in (-1, 1):
            sc = near if side * yaw > 0 else 1.0
            ex = side * ident.eye_dx * (1 - 0.25 * abs(yaw)) + shift
            eye_pos.append(ex)
            ew, eh = ident.eye_w * sc, ident.eye_h * squint
            eyy = ey + side * ident.eye_tilt
            pen.ellipse(ex, eyy, ew, eh, (235, 235, 228))
            ir = min(eh * 1.05, ew * 0.55)
            ix = ex + yaw * ew * 0.3
            pen.ellipse(ix, eyy, ir, ir, ident.iris, n=12)
            pen.ellipse(ix, eyy, ir * 0.45, ir * 0.45, (10, 10, 10), n=12)
            by = eyy - ident.eye_h - ident.brow_gap - brow_raise
            bl, tilt, th = ident.brow_len * sc, ident.brow_tilt * side, ident.brow_thick
            inner, outer = (ex + bl, ex - bl) if side < 0 else (ex - bl, ex + bl)
            pen.poly([[inner, by + tilt], [outer, by - tilt - th * 0.3], [outer, by - tilt + th * 0.5],
                      [inner, by + tilt + th]], ident.brow_colour)
        # nose
        ny0, ny1 = ey + 0.01, ey + ident.nose_len + 0.02
        nx = shift * 1.35
        pen.poly([[nx - 0.006, ny0], [nx + 0.006, ny0], [nx + ident.nose_w, ny1], [nx - ident.nose_w, ny1]],
                 ident.nose_colour)
        nr = ident.nose_w * 0.35
        for side in (-1, 1):
            pen.ellipse(nx + side * ident.nose_w * 0.5, ny1 - nr * 0.3, nr, nr * 0.6, ident.nostril_colour, n=12)
        # mouth: lips bent by the smile, opened by the expression
        mw = ident.mouth_w * (1 + 0.2 * smile) * (1 - 0.2 * abs(yaw))
        mx = shift * 1.1
        lh = ident.lip_h
        xm, bulge = _XM, _BULGE
        curve = -smile * 0.02 * (1 - bulge)
        upper = np.stack([mx + xm * mw, mouth_y + curve - lh * bulge - 0.004 * mouth_open], 1)
        lower = np.stack([mx + xm * mw, mouth_y + curve + (lh + 0.02 * mouth_open) * bulge], 1)[::-1]
        pen.poly(np.concatenate([upper, lower]), ident.lip_colour)
        if mouth_open > 0.05:
            inner_top = np.stack([mx + xm * mw * 0.8, mouth_y + curve - 0.002], 1)
            inner_bot = np.stack([mx + xm * mw * 0.8, mouth_y + curve + 0.016 * mouth_open * bulge], 1)[::-1]
            pen.poly(np.concatenate([inner_top, inner_bot]), (40, 15, 15))
        self._draw_hair(pen, ident, shift, hair, hair_jit, u[11])
        # occluders that move with the face: glasses, a mask
        if u[12] < 0.15:
            dark = u[13] < 0.4
            col = (int(20 + 60 * u[14]), int(20 + 40 * u[15]), int(20 + 40 * u[14]))
            gw = max(ident.eye_w * 1.5, 0.05)
            for ex in eye_pos:
                if dark:
                    pen.ellipse(ex, ey, gw, gw * 0.75, col)
                else:
                    pen.ellipse(ex, ey, gw, gw * 0.75, outline=col, width=0.015)
            pen.line([[eye_pos[0] + gw, ey], [eye_pos[1] - gw, ey]], col, 0.015)
        if u[16] < 0.05:
            mcol = (int(150 + 100 * u[17]), int(170 + 80 * u[18]), int(200 + 55 * u[17]))
            top = ey + ident.nose_len * 0.6
            pen.poly([[-fw * 0.98 + shift * 0.2, top], [fw * 0.98 + shift * 0.2, top], [fw * 0.7, fy + fh * 0.8],
                      [0, fy + fh + 0.01], [-fw * 0.7, fy + fh * 0.8]], mcol)

    def _draw_pattern(self, pen: _Pen, ident: Identity, yaw, shift, vshift) -> None:
        """Identity-specific skin pattern, drawn under the eyes, brows and mouth."""
        fy, col, sq = ident.face_y, ident.pattern_colour, 1 - 0.1 * abs(yaw)
        if ident.pattern == 1:  # freckles across nose and cheeks
            for x, y in ident.pattern_dots:
                pen.ellipse(x * sq + shift, fy + y + vshift, 0.007, 0.007, col, n=12)
        elif ident.pattern == 2:  # forehead lines
            top = fy + ident.hairline + 0.04
            for j in range(3):
                y = top + 0.02 * j + vshift
                pen.line([[-0.09 * sq + shift, y], [0.09 * sq + shift, y + 0.004]], col, 0.008)
        elif ident.pattern == 3:  # dark circles under the eyes
            for side in (-1, 1):
                ex = side * ident.eye_dx * (1 - 0.25 * abs(yaw)) + shift
                pen.ellipse(ex, fy + ident.eye_y + ident.eye_h + 0.012 + vshift, ident.eye_w * 1.1, 0.012, col)
        else:  # a scar across one cheek
            x, y = ident.pattern_dots[0]
            side = 1 if x >= 0 else -1
            x0 = side * (ident.eye_dx + 0.01) * sq + shift
            pen.line([[x0 - 0.03, fy + 0.03 + y * 0.5 + vshift], [x0 + 0.03, fy + 0.09 + y * 0.5 + vshift]], col, 0.012)

    def _draw_hair(self, pen: _Pen, ident: Identity, shift, hair, jit, u) -> None:
        style = ident.hair_style
        if style == 0 and u < 0.7:  # bald or shaved (sometimes a little stubble shows)
            return
        fw, fh, fy = ident.face_w, ident.face_h, ident.face_y
        vol = ident.hair_volume * jit
        rx, ry = fw + vol * 0.6, fh + vol
        outer = np.stack([rx * _HAIR_COS - shift * 0.3, fy + ry * _HAIR_SIN], 1)
        if style == 5:  # curly: bumpy outline
            outer[:, 1] -= 0.014 * np.abs(np.sin(_HAIR_T * (6 + 6 * ident.hair_wave)))
        xs = fw * _HAIR_X
        hl = fy + ident.hairline
        if style in (1, 2):  # straight fringe
            line_y = hl + 0.0 * xs
        elif style == 3:  # side part: tilted fringe
            line_y = hl + 0.12 * (xs / fw) * (ident.hair_wave - 0.5)
        elif style == 4:  # middle part: hairline arcs up
            line_y = hl - 0.03 * (1 - (xs / fw) ** 2)
        else:  # receding
            line_y = hl - 0.05 * (1 - (xs / fw) ** 2) - 0.04
        line_y = line_y + (0.06 if style in (2, 4) else 0.02) * (np.abs(xs) / fw) ** 4
        pen.poly(np.concatenate([outer, np.stack([xs - shift * 0.5, line_y], 1)]), hair)

    def render_jpeg(self, ident: Identity, r: np.random.Generator) -> bytes:
        img = self.render(ident, r)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=int(45 + 50 * r.random()))
        return buf.getvalue()


def render_instance(renderer: FaceRenderer, seed: int, identity: int, instance: int,
                    stream: int = _INSTANCE, ident: Identity | None = None) -> bytes:
    """JPEG bytes of one instance: a pure function of (seed, identity, instance, stream)."""
    if ident is None:
        ident = identity_params(seed, identity)
    return renderer.render_jpeg(ident, np.random.default_rng([seed, stream, identity, instance]))


# --------------------------------------------------------------------------- long-tail profiles
def _norm_ppf(p: np.ndarray) -> np.ndarray:
    from statistics import NormalDist

    nd = NormalDist()
    return np.array([nd.inv_cdf(float(min(max(x, 1e-12), 1 - 1e-12))) for x in p])


_MF2_SMALL = np.arange(1, 10)
_MF2_SMALL_P = _MF2_SMALL ** -1.2 / np.sum(_MF2_SMALL ** -1.2)
_MF2_SMALL_FRACTION = 0.88


def images_per_identity(profile: str, identities: int, seed: int = 0) -> np.ndarray:
    """Training images of each identity for a named long-tail profile.

    Counts are drawn by stratified sampling of the profile's quantile function (one draw per
    1/N slice of probability, then shuffled), so even small sets have the profile's shape:

    - ``ms1m``: log-normal, median 40, sigma 0.7, clipped to [2, 400] (MS1MV2 has ~68 per identity,
      most identities tens of images, a head of a few hundred);
    - ``mf2``: 88% of identities have 1-9 images with P(k) proportional to k^-1.2 (many have 1-3),
      the rest a Pareto tail from 10 up to 500 (MegaFace2-like).
    """
    if profile not in PROFILES:
        raise DcqError(f"unknown profile {profile!r}; choose one of {', '.join(PROFILES)}")
    if identities < 1:
        raise DcqError(f"identities must be at least 1, got {identities}")
    r = np.random.default_rng([seed, _COUNTS])
    q = (r.permutation(identities) + r.random(identities)) / identities
    if profile == "ms1m":
        counts = np.exp(math.log(40.0) + 0.7 * _norm_ppf(q))
        counts = np.clip(np.rint(counts), 2, 400)
    else:
        cdf = np.cumsum(_MF2_SMALL_P) * _MF2_SMALL_FRACTION
        small = q < _MF2_SMALL_FRACTION
        counts = np.empty(identities)
        counts[small] = _MF2_SMALL[np.searchsorted(cdf, q[small], side="right").clip(0, 8)]
        v = (q[~small] - _MF2_SMALL_FRACTION) / (1 - _MF2_SMALL_FRACTION)
        counts[~small] = np.minimum(np.floor(10 * (1 - v) ** (-1 / 1.2)), 500)
    return counts.astype(np.int64)


_BUCKETS = ((1, 1), (2, 2), (3, 4), (5, 9), (10, 19), (20, 49), (50, 99), (100, 199), (200, None))


def count_histogram(counts: np.ndarray) -> dict:
    """Number of identities per images-per-identity bucket ("1", "2", "3-4", ..., "200+")."""
    out = {}
    for lo, hi in _BUCKETS:
        name = f"{lo}+" if hi is None else (str(lo) if lo == hi else f"{lo}-{hi}")
        sel = counts >= lo if hi is None else (counts >= lo) & (counts <= hi)
        out[name] = int(np.count_nonzero(sel))
    return out


# --------------------------------------------------------------------------- rendering jobs
_RENDERERS: dict[int, FaceRenderer] = {}


def _renderer(image_size: int) -> FaceRenderer:
    r = _RENDERERS.get(image_size)
    if r is None:
        r = _RENDERERS[image_size] = FaceRenderer(image_size)
    return r


def _render_job(job: tuple) -> list[bytes]:
    """Render a list of (identity, first instance, count, stream) runs; used in-process and by workers."""
    seed, image_size, runs = job
    renderer = _renderer(image_size)
    out = []
    for identity, first, count, stream in runs:
        ident = identity_params(seed, identity)
        for k in range(first, first + count):
            out.append(render_instance(renderer, seed, identity, k, stream, ident))
    return out


def _jobs(seed: int, image_size: int, runs: list[tuple], per_job: int = 256):
    """Group runs into jobs of about per_job images, splitting long runs."""
    batch, n = [], 0
    for identity, first, count, stream in runs:
        while count > 0:
            take = min(count, per_job - n)
            batch.append((identity, first, take, stream))
            first += take
            count -= take
            n += take
            if n >= per_job:
                yield (seed, image_size, batch)
                batch, n = [], 0
    if batch:
        yield (seed, image_size, batch)


class _Renderer:
    """Runs jobs in order, in this process or in a pool; yields image bytes."""

    def __init__(self, workers: int):
        self.workers = max(1, int(workers))
        self.pool = None
        if self.workers > 1:
            import multiprocessing as mp

            # fork where there is one (no re-import of the caller's script); output does not depend on it
            method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
            self.pool = mp.get_context(method).Pool(self.workers)

    def images(self, seed: int, image_size: int, runs: list[tuple]):
        jobs = _jobs(seed, image_size, runs)
        results = self.pool.imap(_render_job, jobs) if self.pool else map(_render_job, jobs)
        for chunk in results:
            yield from chunk

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool.join()
            self.pool = None


# --------------------------------------------------------------------------- verification pairs
def _val_pairs(seed: int, first_identity: int, val_identities: int, pairs: int) -> list[tuple]:
    """10 folds of pairs, positives and negatives alternating inside every fold.

    Returns ``[(identity_a, instance_a, identity_b, instance_b, same), ...]``; every image is a fresh
    instance, and identities are cycled so all of them appear.
    """
    if val_identities < 2:
        raise DcqError(f"val_identities must be at least 2 to form negative pairs, got {val_identities}")
    r = np.random.default_rng([seed, _PAIRS])
    next_instance = np.zeros(val_identities, dtype=np.int64)
    order = r.permutation(val_identities)
    pos_i = 0
    out = []

    def take(local: int) -> tuple[int, int]:
        k = int(next_instance[local])
        next_instance[local] += 1
        return first_identity + local, k

    for j in range(pairs):
        if j % 2 == 0:
            local = int(order[pos_i % val_identities])
            pos_i += 1
            a, b = take(local), take(local)
            out.append((*a, *b, True))
        else:
            la, lb = r.choice(val_identities, size=2, replace=False)
            out.append((*take(int(la)), *take(int(lb)), False))
    return out


# --------------------------------------------------------------------------- synthesize
_PRODUCTS = ("train.rec", "train.idx", "train", "val.bin", "probe.rec", "probe.idx")


def _round_pairs(pairs: int) -> int:
    """Round up to a multiple of 20: 10 folds, each half positive."""
    return max(20, math.ceil(pairs / 20.0) * 20)


def synthesize(out_dir, profile: str = "ms1m", identities: int = 1000, image_size: int = 112,
               fmt: str = "rec", seed: int = 0, val_identities: int | None = None,
               val_pairs: int | None = None, probes_per_identity: int = 1, workers: int = 1,
               progress: bool = True) -> dict:
    """Write a synthetic long-tailed face dataset in insightface formats; returns its stats.

    Files: ``train.rec``/``train.idx`` (header layout) or ``train/<identity>/<n>.jpg``; ``val.bin``
    (pairs of identities never used for training); ``probe.rec``/``probe.idx`` (plain layout,
    held-out images of training identities, label = training label); ``stats.json`` (written last:
    a folder without it is incomplete). Everything is built in a temporary folder inside ``out_dir``
    and moved into place at the end.
    """
    from tqdm import tqdm

    from dcq.data.recordio import write_face_recordio
    from dcq.data.verification_bin import write_bin

    if fmt not in ("rec", "folder"):
        raise DcqError(f"unknown format {fmt!r}; choose 'rec' or 'folder'")
    image_size = int(image_size)
    if not 16 <= image_size <= 1024:
        raise DcqError(f"image_size {image_size} is out of range; use 16..1024 (insightface uses 112)")
    if probes_per_identity < 0:
        raise DcqError(f"probes_per_identity must be >= 0, got {probes_per_identity}")
    counts = images_per_identity(profile, int(identities), seed)
    n_ids = len(counts)
    if val_identities is None:
        val_identities = int(min(2000, max(50, n_ids // 5)))
    if int(val_identities) < 2:
        raise DcqError(f"val_identities must be at least 2 to form negative pairs, got {val_identities}")
    if val_pairs is not None and int(val_pairs) < 1:
        raise DcqError(f"val_pairs must be at least 1, got {val_pairs}")
    val_pairs = _round_pairs(6000 if val_pairs is None else int(val_pairs))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = (out_dir / "stats.json").is_file()
    if not previous:
        clash = [p for p in _PRODUCTS if (out_dir / p).exists()]
        if clash:
            raise DcqError(
                f"{out_dir}: already holds {clash[0]} that `dcq synth` did not write (no stats.json); "
                "choose an empty or new output folder"
            )
    tmp = out_dir / f".synth-tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    t0 = time.perf_counter()
    total = int(counts.sum()) + n_ids * probes_per_identity + 2 * val_pairs
    bar = tqdm(total=total, desc=f"synth {profile}", unit="img", disable=not progress, dynamic_ncols=True)
    engine = _Renderer(workers)
    try:
        # training images, sorted by label
        runs = [(c, 0, int(n), _INSTANCE) for c, n in enumerate(counts)]
        labels = np.repeat(np.arange(n_ids), counts)

        def train_items():
            for lab, img in zip(labels, engine.images(seed, image_size, runs)):
                bar.update(1)
                yield int(lab), img

        if fmt == "rec":
            write_face_recordio(tmp, train_items(), name="train", header=True, num_identities=n_ids)
        else:
            # zero-padded names: sorted folder order (how ImageFolderDataset numbers) = label order
            width = max(6, len(str(n_ids - 1)))
            kwidth = max(4, len(str(int(counts.max()) - 1)))
            (tmp / "train").mkdir()
            prev, k = -1, 0
            for lab, img in train_items():
                d = tmp / "train" / f"id_{lab:0{width}d}"
                if lab != prev:
                    d.mkdir()
                    prev, k = lab, 0
                (d / f"{k:0{kwidth}d}.jpg").write_bytes(img)
                k += 1
        # probes: held-out instances of training identities
        probe_runs = [(c, int(n), probes_per_identity, _INSTANCE) for c, n in enumerate(counts)] \
            if probes_per_identity else []
        probe_labels = np.repeat(np.arange(n_ids), probes_per_identity)

        def probe_items():
            for lab, img in zip(probe_labels, engine.images(seed, image_size, probe_runs)):
                bar.update(1)
                yield int(lab), img

        write_face_recordio(tmp, probe_items(), name="probe", header=False)
        # verification pairs from identities never seen in training
        pairs = _val_pairs(seed, n_ids, val_identities, val_pairs)
        val_runs = []
        for ia, ka, ib, kb, _ in pairs:
            val_runs.append((ia, ka, 1, _VAL_INSTANCE))
            val_runs.append((ib, kb, 1, _VAL_INSTANCE))
        val_images = []
        for img in engine.images(seed, image_size, val_runs):
            val_images.append(img)
            bar.update(1)
        write_bin(tmp / "val.bin", val_images, [p[4] for p in pairs])
    except BaseException:
        engine.close()
        bar.close()
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    engine.close()
    bar.close()
    seconds = time.perf_counter() - t0

    stats = {
        "generator": "dcq.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "profile": profile,
        "seed": int(seed),
        "image_size": image_size,
        "format": fmt,
        "identities": n_ids,
        "images": int(counts.sum()),
        "train_images_per_identity": counts.tolist(),
        "histogram": count_histogram(counts),
        "fraction_under_10": float(np.mean(counts < 10)),
        "median_images_per_identity": float(np.median(counts)),
        "mean_images_per_identity": float(np.mean(counts)),
        "max_images_per_identity": int(counts.max()),
        "min_images_per_identity": int(counts.min()),
        "val_pairs": int(val_pairs),
        "val_positive_pairs": int(val_pairs // 2),
        "val_folds": 10,
        "val_identities": int(val_identities),
        "val_identity_range": [n_ids, n_ids + int(val_identities)],
        "probes": int(n_ids * probes_per_identity),
        "probes_per_identity": int(probes_per_identity),
        "files": {"train": "train.rec" if fmt == "rec" else "train/", "val": ["val.bin"], "probe": "probe.rec"},
    }
    with open(tmp / "stats.json", "w") as f:
        json.dump(stats, f, indent=1)
        f.write("\n")
    _publish(tmp, out_dir, fmt)
    result = dict(stats)
    result["seconds"] = seconds
    result["images_per_second"] = total / max(seconds, 1e-9)
    result["rendered_images"] = total
    return result


def _publish(tmp: Path, out_dir: Path, fmt: str) -> None:
    """Move finished files from tmp into out_dir; stats.json goes last and marks completion."""
    stats = out_dir / "stats.json"
    if stats.exists():
        stats.unlink()
    stale = ["train"] if fmt == "rec" else ["train.rec", "train.idx"]
    for name in stale:
        p = out_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
    for name in ("train.rec", "train.idx", "train", "probe.rec", "probe.idx", "val.bin"):
        src = tmp / name
        if not src.exists():
            continue
        dst = out_dir / name
        if src.is_dir():
            if dst.exists():
                trash = out_dir / f".synth-old-{os.getpid()}"
                os.replace(dst, trash)
                os.replace(src, dst)
                shutil.rmtree(trash)
            else:
                os.replace(src, dst)
        else:
            os.replace(src, dst)
    os.replace(tmp / "stats.json", stats)
    shutil.rmtree(tmp, ignore_errors=True)
