"""What a TensorRT engine was built for, part of its metadata, and why it cannot run elsewhere.

Engines are tied to the TensorRT version and the GPU (and on Jetson the JetPack) they were built with, so
:class:`EngineTarget` records all three and :func:`engine_mismatch` says, in one line naming both sides,
why an engine cannot run here (``tledge_runtime.backends.nvidia.target_here`` describes this machine).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from tledge_runtime.model.bounds import check, check_name


@dataclass(frozen=True)
class EngineTarget:
    """What an engine was built for (stored in the engine's metadata) or what this machine offers."""

    tensorrt: str  # version, e.g. "10.3.0"
    flavour: str = "tensorrt"  # tensorrt | tensorrt-rtx
    compute_capability: str = ""  # e.g. "8.7"; "" when built ahead of time for no particular GPU
    l4t: str = ""  # Jetson Linux release, e.g. "36.3.0"; "" off a Jetson

    def __post_init__(self) -> None:
        for name in ("tensorrt", "flavour", "compute_capability", "l4t"):
            check_name(getattr(self, name), f"engine {name}", empty_ok=name != "tensorrt")
        check(self.flavour in ("tensorrt", "tensorrt-rtx"), "engine flavour must be tensorrt or tensorrt-rtx")

    def to_dict(self) -> dict[str, str]:
        return {"tensorrt": self.tensorrt, "flavour": self.flavour, "compute_capability": self.compute_capability,
                "l4t": self.l4t}


def engine_mismatch(built: EngineTarget, here: EngineTarget) -> Optional[str]:
    """Why an engine built for ``built`` cannot run ``here`` (one line naming both sides), or None.

    TensorRT engines are tied to the TensorRT version and the GPU architecture; on Jetson also to the L4T
    release. Engines of TensorRT for RTX are portable across RTX GPUs, so for them only the flavour
    and the version count.
    """
    if built.flavour != here.flavour:
        return f"the engine was built with {built.flavour} {built.tensorrt}, this machine has {here.flavour} {here.tensorrt}"
    if built.tensorrt != here.tensorrt:
        return f"the engine was built with {built.flavour} {built.tensorrt}, this machine has {here.tensorrt}"
    if built.flavour == "tensorrt" and built.compute_capability and here.compute_capability \
            and built.compute_capability != here.compute_capability:
        return (f"the engine was built for a GPU of compute capability {built.compute_capability}, "
                f"this GPU is {here.compute_capability}")
    if built.l4t and here.l4t and built.l4t != here.l4t:
        return f"the engine was built on L4T {built.l4t} (JetPack), this device runs L4T {here.l4t}"
    return None
