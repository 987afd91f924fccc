"""The backends by name (imported on first use by :func:`sftkey.core.driver.resolve_backend`):
``"torch"`` (:mod:`.torch`), ``"triton"`` (:mod:`.triton`), ``"triton-fused"``
(:mod:`.triton_fused`); ``"auto"`` picks one per call, ``"reference"`` is the oracle
(:mod:`sftkey.reference`). The contract and the group engine they share: :mod:`.engine`."""

#: name -> "module:class"
REGISTRY = {
    "torch": "sftkey.backends.torch:TorchBackend",
    "triton": "sftkey.backends.triton:TritonBackend",
    "triton-fused": "sftkey.backends.triton_fused:FusedTritonBackend",
}
#: Every backend name an option may take.
NAMES = ("auto", "reference", *REGISTRY)
#: The names the two-head operations take (the fused tile kernels have no two-head form).
TWO_HEAD_NAMES = ("auto", "torch", "triton", "reference")
