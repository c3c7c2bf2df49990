"""The embedded synthetic face data: long-tailed identities rendered as face-like images.

- ``synthesize`` (`dataset`): a training set with probes and a verification ``.bin`` in insightface's
  formats (also ``dcq.data.synthesize``);
- ``synthesize_ijb`` / ``synthesize_megaface`` (`protocols`): IJB-like and MegaFace-like benchmark sets;
- `identity` (an identity's latent face and the named random draws), `render` (one instance as an
  image), `profiles` (images per identity, bucket names), `cli` (`dcq synth`).

Names load on first use, so ``import dcq.data`` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from dcq.lazy import lazy_attributes

_EXPORTS = {
    "synthesize": "dcq.data.synth.dataset",
    "synthesize_ijb": "dcq.data.synth.protocols",
    "synthesize_megaface": "dcq.data.synth.protocols",
    "FaceRenderer": "dcq.data.synth.render",
    "render_instance": "dcq.data.synth.render",
    "identity_params": "dcq.data.synth.identity",
    "PROFILES": "dcq.data.synth.profiles",
    "bucket_name": "dcq.data.synth.profiles",
    "count_histogram": "dcq.data.synth.profiles",
    "images_per_identity": "dcq.data.synth.profiles",
}

__all__ = [
    "PROFILES",
    "FaceRenderer",
    "bucket_name",
    "count_histogram",
    "identity_params",
    "images_per_identity",
    "render_instance",
    "synthesize",
    "synthesize_ijb",
    "synthesize_megaface",
]

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from dcq.data.synth.dataset import synthesize
    from dcq.data.synth.identity import identity_params
    from dcq.data.synth.profiles import PROFILES, bucket_name, count_histogram, images_per_identity
    from dcq.data.synth.protocols import synthesize_ijb, synthesize_megaface
    from dcq.data.synth.render import FaceRenderer, render_instance

__getattr__, __dir__ = lazy_attributes(__name__, _EXPORTS)
