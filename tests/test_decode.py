"""JPEG decoding through libjpeg-turbo (simplejpeg) gives Pillow's pixels; Pillow stays the fallback."""

import io
import logging
import math

import numpy as np
import pytest
from PIL import Image

from dcq.data import decode as decode_mod
from dcq.data.decode import decode_bytes, draft_scale, resolve_decoder
from dcq.data.transforms import decode_image
from dcq.errors import DcqError

try:
    import simplejpeg
except ImportError:  # the Pillow fallback is still tested below
    simplejpeg = None
needs_turbo = pytest.mark.skipif(simplejpeg is None, reason="the fast-jpeg extra (simplejpeg) is not installed")


@pytest.fixture(autouse=True)
def _fresh_choice(monkeypatch):
    """Every test resolves the decoder itself, with no DCQ_JPEG_DECODER from the caller's shell."""
    monkeypatch.delenv(decode_mod.ENV_VAR, raising=False)
    monkeypatch.setattr(decode_mod, "_resolved", {})
    monkeypatch.setattr(decode_mod, "_fallback_logged", False)


@pytest.fixture
def turbo_only(monkeypatch):
    """decode_bytes(decoder="turbo") must not quietly hand the image to Pillow: the comparison would be void."""
    def refuse(*_a, **_k):
        raise AssertionError("Pillow was asked to decode an image simplejpeg should have decoded")

    monkeypatch.setattr(decode_mod, "_decode_pil", refuse)


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients plus noise: chroma detail that subsampling and the IDCT both see."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 / max(1, w - 1), yy * 255 / max(1, h - 1), (xx + yy) % 97 * 2.6], axis=2)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _jpeg(img: np.ndarray, **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", **kw)
    return buf.getvalue()


def _pillow_reference(data: bytes, image_size=None) -> np.ndarray:
    """What the loader decoded before simplejpeg: Pillow, draft to image_size, convert to RGB."""
    with Image.open(io.BytesIO(data)) as pil:
        if image_size is not None:
            pil.draft("RGB", (image_size, image_size))
        return np.array(pil.convert("RGB"))


JPEGS = {
    "q45 4:2:0": (lambda: _jpeg(_photo(112, 112), quality=45)),
    "q95 4:2:0": (lambda: _jpeg(_photo(112, 112, 1), quality=95)),
    "q75 4:2:2": (lambda: _jpeg(_photo(112, 112, 2), quality=75, subsampling=1)),
    "q90 4:4:4": (lambda: _jpeg(_photo(112, 112, 3), quality=90, subsampling=0)),
    "progressive": (lambda: _jpeg(_photo(112, 112, 4), quality=80, progressive=True)),
    "odd size 37x53": (lambda: _jpeg(_photo(37, 53, 5), quality=85)),
    "grey": (lambda: _jpeg(_photo(64, 48, 6)[..., 1], quality=85)),
}


@needs_turbo
@pytest.mark.parametrize("name", sorted(JPEGS))
def test_turbo_pixels_equal_pillow(name, turbo_only):
    data = JPEGS[name]()
    ref = _pillow_reference(data)
    got = decode_bytes(data, decoder="turbo")
    assert got.dtype == np.uint8 and got.shape == ref.shape and got.shape[2] == 3
    np.testing.assert_array_equal(got, ref)


@needs_turbo
@pytest.mark.parametrize("stored, size", [((230, 240), 112), ((460, 470), 112), ((900, 1000), 112),
                                          ((300, 200), 112), ((120, 120), 112)])
def test_turbo_shrinks_in_the_dct_like_pillow_draft(stored, size):
    h, w = stored
    data = _jpeg(_photo(h, w, 7), quality=90)
    ref = _pillow_reference(data, size)
    s = draft_scale(w, h, size)
    direct = simplejpeg.decode_jpeg(data, min_height=math.ceil(h / s), min_width=math.ceil(w / s))
    assert direct.shape == ref.shape  # simplejpeg shrinks by the same factor, so the turbo path is taken
    np.testing.assert_array_equal(decode_bytes(data, size, decoder="turbo"), ref)
    # and after the final resize to image_size
    np.testing.assert_array_equal(decode_image(data, size, decoder="turbo"), decode_image(data, size, decoder="pil"))
    assert decode_image(data, size, decoder="turbo").shape == (size, size, 3)


def test_draft_scale_is_pillows_choice():
    for w, h in [(112, 112), (224, 230), (450, 460), (897, 1000), (1000, 230), (5000, 5000), (50, 40)]:
        for size in (112, 56):
            s = draft_scale(w, h, size)
            with Image.open(io.BytesIO(_jpeg(np.zeros((h, w, 3), np.uint8)))) as pil:
                pil.draft("RGB", (size, size))
                assert pil.size == (math.ceil(w / s), math.ceil(h / s)), (w, h, size, s)
            # the largest of 1, 2, 4, 8 that keeps both sides >= size (or 1 when even that does not)
            ok = [f for f in (1, 2, 4, 8) if w // f >= size and h // f >= size]
            assert s == (max(ok) if ok else 1)
    assert draft_scale(5000, 5000, None) == 1


@needs_turbo
def test_synthetic_faces_decode_identically(turbo_only):
    from dcq.data.synth import FaceRenderer, identity_params, render_instance

    renderer = FaceRenderer(112)
    for k in range(6):
        data = render_instance(renderer, 3, k, k, ident=identity_params(3, k))
        assert data[:3] == b"\xff\xd8\xff"
        np.testing.assert_array_equal(decode_bytes(data, 112, decoder="turbo"), _pillow_reference(data, 112))


@needs_turbo
def test_turbo_shrunk_decode_is_simplejpegs(turbo_only):
    data = _jpeg(_photo(460, 470, 12), quality=90)
    got = decode_bytes(data, 112, decoder="turbo")  # Pillow is refused: this is simplejpeg's output
    assert got.shape == (115, 118, 3)  # ceil(460 / 4), ceil(470 / 4)


@needs_turbo
def test_png_and_cmyk_jpeg_go_to_pillow():
    img = _photo(20, 24, 8)
    png = io.BytesIO()
    Image.fromarray(img).save(png, format="PNG")
    np.testing.assert_array_equal(decode_bytes(png.getvalue(), decoder="turbo"), img)
    cmyk = io.BytesIO()
    Image.fromarray(img).convert("CMYK").save(cmyk, format="JPEG", quality=90)
    assert simplejpeg.decode_jpeg_header(cmyk.getvalue())[2] == "CMYK"
    np.testing.assert_array_equal(decode_bytes(cmyk.getvalue(), decoder="turbo"), _pillow_reference(cmyk.getvalue()))


@needs_turbo
def test_corrupt_jpeg_fails_with_the_same_message_for_both_decoders():
    data = _jpeg(_photo(112, 112, 9), quality=90)
    for bad in (data[: len(data) // 3], data[:2] + b"\x00" * 40, b"\xff\xd8\xff" + b"\x13" * 64):
        messages = []
        for decoder in ("turbo", "pil"):
            with pytest.raises(DcqError, match=r"cannot decode image \(x.rec record 5\)") as exc:
                decode_bytes(bad, where="x.rec record 5", decoder=decoder)
            messages.append(str(exc.value))
        assert messages[0] == messages[1]


@needs_turbo
def test_decompression_bomb_guard_holds_for_turbo(monkeypatch):
    data = _jpeg(_photo(64, 64, 10))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 > 2*1000: Pillow refuses
    for decoder in ("turbo", "pil"):
        with pytest.raises(DcqError, match="too many pixels"):
            decode_bytes(data, decoder=decoder)


@needs_turbo
def test_choice_of_decoder(monkeypatch):
    assert resolve_decoder() == "turbo"  # auto, simplejpeg installed
    assert resolve_decoder("auto") == "turbo"
    assert resolve_decoder("PIL") == "pil"
    monkeypatch.setenv(decode_mod.ENV_VAR, "pil")
    assert resolve_decoder() == "pil"
    assert resolve_decoder("turbo") == "turbo"  # the argument wins over the environment
    with pytest.raises(DcqError, match="unknown JPEG decoder 'jpegli' .decoder.; choose one of auto, turbo, pil"):
        resolve_decoder("jpegli")
    monkeypatch.setenv(decode_mod.ENV_VAR, "fast")
    with pytest.raises(DcqError, match=f"unknown JPEG decoder 'fast' .{decode_mod.ENV_VAR}."):
        decode_bytes(_jpeg(_photo(8, 8)))


def test_without_simplejpeg_auto_falls_back_to_pillow_with_one_log_line(monkeypatch, caplog):
    monkeypatch.setattr(decode_mod, "_simplejpeg", False)  # as when the import failed
    data = _jpeg(_photo(16, 16, 11))
    with caplog.at_level(logging.INFO, logger="dcq.data.decode"):
        for _ in range(3):
            np.testing.assert_array_equal(decode_bytes(data), _pillow_reference(data))
        assert resolve_decoder("auto") == "pil"
    lines = [r for r in caplog.records if "simplejpeg is not installed" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.WARNING
    with pytest.raises(DcqError, match=r"needs simplejpeg.*pip install 'dcq\[fast-jpeg\]'"):
        resolve_decoder("turbo")
