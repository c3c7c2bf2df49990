"""What the detector needs of MTCNN's three networks, whichever runtime runs them.

`dcq.deploy.detect.OnnxNetworks` (onnxruntime, the deploy path) and
`dcq.deploy.mtcnn_nets.TorchNetworks` (torch, the reference) both implement it; it lives apart so
that neither runtime's module imports the other's.
"""

from __future__ import annotations

import numpy as np


class Networks:
    """The three networks as ``pnet``, ``rnet``, ``onet``: float32 NCHW array -> list of output arrays."""

    def _run(self, name: str, x: np.ndarray) -> list[np.ndarray]:
        raise NotImplementedError

    def pnet(self, x):
        return self._run("pnet", x)

    def rnet(self, x):
        return self._run("rnet", x)

    def onet(self, x):
        return self._run("onet", x)
