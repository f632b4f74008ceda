"""The architecture names of the registry (:data:`tledge.models.ARCHS`), without importing torch.

The CLI offers them as ``--arch`` choices; importing :mod:`tledge.models` for that would
import torch on every ``tledge --help``. A test checks that both lists name the same models.
"""

ARCH_NAMES = ("efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2", "resnet18", "resnet34", "resnet50")
DEFAULT_ARCH = "efficientnet_lite0"  # the one whose ImageNet weights need no download and train fastest
