"""Rendering of the synthetic face dataset: one instance of an identity as a face-like image.

Each image draws a fresh instance (pose, yaw, light, expression, blur, noise, occluders, background,
JPEG quality; see `InstanceDraws`) and is drawn with PIL at the requested size. Every image is a pure
function of ``(seed, identity, instance)``.
"""

from __future__ import annotations

import io
import math
from typing import ClassVar

import numpy as np
from PIL import Image, ImageChops, ImageDraw, ImageFilter

from dcq.data.synth.identity import _INSTANCE, Identity, InstanceDraws, identity_params
from dcq.errors import DcqError

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
        u = InstanceDraws(*r.random(len(InstanceDraws._fields)).tolist())
        S, C = self.size, self.canvas
        # ---- background: colour plus a few clutter shapes (not posed)
        img = Image.new("RGB", (C, C), tuple(int(255 * v) for v in (u.background_r, u.background_g, u.background_b)))
        d = ImageDraw.Draw(img)
        for j in range(int(u.clutter * 4)):
            v = r.random(7)
            x0, y0 = (v[3] - 0.3) * C, (v[4] - 0.3) * C
            box = (x0, y0, x0 + C * (0.2 + 0.6 * v[5]), y0 + C * (0.2 + 0.6 * v[6]))
            (d.ellipse if j % 2 else d.rectangle)(box, fill=tuple(int(x) for x in v[:3] * 255))

        # ---- pose: rotation, scale, shift (applied to vertices) and yaw / pitch (moves features)
        ang = (u.rotation * 2 - 1) * 0.25
        scale = 0.86 + 0.30 * u.scale
        tx, ty = (u.shift_x - 0.5) * 0.16, (u.shift_y - 0.5) * 0.16
        ca, sa = math.cos(ang) * scale * C, math.sin(ang) * scale * C
        pen = _Pen(d, np.array([[ca, sa], [-sa, ca]]), np.array([(0.5 + tx) * C, (0.5 + ty) * C]), scale * C)
        yaw = (u.yaw * 2 - 1) * 0.75
        pitch = (u.pitch * 2 - 1) * 0.5
        smile, mouth_open = u.smile, max(0.0, u.mouth_open * 1.6 - 0.6)
        brow_raise = (u.brow_raise - 0.3) * 0.02
        squint = 0.6 + 0.6 * u.squint
        hair_jit = 0.85 + 0.3 * u.hair_jitter
        self._draw_face(pen, ident, yaw, pitch, smile, mouth_open, brow_raise, squint, hair_jit, u, r)
        pen.flush()

        # ---- a random patch anywhere (hand, microphone, caption), not posed
        if u.patch < 0.10:
            v = r.random(7)
            pw, ph = C * (0.12 + 0.18 * v[3]), C * (0.10 + 0.15 * v[4])
            x0, y0 = v[5] * (C - pw), v[6] * (C - ph)
            d.rectangle((x0, y0, x0 + pw, y0 + ph), fill=tuple(int(x) for x in v[:3] * 255))
        if self.ss > 1:
            img = img.reduce(self.ss)

        # ---- blur
        blur = u.blur ** 2 * 1.4 * S / 112
        if blur > 0.3:
            img = img.filter(ImageFilter.BoxBlur(blur))
        # ---- exposure, contrast, colour cast as one per-channel lookup table
        bright = 0.8 + 0.45 * u.brightness
        contrast = 0.75 + 0.45 * u.contrast
        level = int(u.light_level * 6)
        lift = 1.0 / (1 - 0.12 * (level + 1) / 2)  # keep mean brightness under the light field
        gain = bright * lift * (1 + (np.array((u.cast_r, u.cast_g, u.cast_b), dtype=np.float32)[:, None] - 0.5) * 0.2)
        lut = np.clip(((_RAMP - 128) * contrast + 128) * gain + 0.5, 0, 255).astype(np.uint8).ravel().tolist()
        img = _apply_lut(img, lut)
        # ---- directional light, then sensor noise
        img = ImageChops.multiply(img, self._light(int(u.light_direction * self.N_LIGHT_DIRS), level))
        if u.noise < 0.75:
            k = int(u.noise_level * len(self.NOISE_LEVELS))
            ox, oy = int(u.noise_x * self._pad), int(u.noise_y * self._pad)
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
        self._draw_hair(pen, ident, shift, hair, hair_jit, u.stubble)
        # occluders that move with the face: glasses, a mask
        if u.glasses < 0.15:
            dark = u.glasses_dark < 0.4
            col = (int(20 + 60 * u.glasses_tone), int(20 + 40 * u.glasses_tone2), int(20 + 40 * u.glasses_tone))
            gw = max(ident.eye_w * 1.5, 0.05)
            for ex in eye_pos:
                if dark:
                    pen.ellipse(ex, ey, gw, gw * 0.75, col)
                else:
                    pen.ellipse(ex, ey, gw, gw * 0.75, outline=col, width=0.015)
            pen.line([[eye_pos[0] + gw, ey], [eye_pos[1] - gw, ey]], col, 0.015)
        if u.mask < 0.05:
            mcol = (int(150 + 100 * u.mask_tone), int(170 + 80 * u.mask_tone2), int(200 + 55 * u.mask_tone))
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

    def _draw_hair(self, pen: _Pen, ident: Identity, shift, hair, jit, stubble: float) -> None:
        style = ident.hair_style
        if style == 0 and stubble < 0.7:  # bald or shaved (sometimes a little stubble shows)
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
