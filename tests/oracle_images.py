"""transformers' Llama 4 image processor and processor, the oracle for our preprocessing.

They need torchvision. The only torchvision on the package registries is built against CUDA
torch, and its compiled ops (detection ops: nms, roi_align, ...) cannot load next to the CPU
build of torch; torchvision's import then fails where it registers fake kernels for `nms` and
`qnms`. Declaring those two operator schemas first lets it import. Nothing the image processor
uses (resize, pad, normalise: plain torch) depends on the compiled ops.
"""

from __future__ import annotations

import sys

import torch

_lib = None


def import_torchvision():
    """Import torchvision (if installed), declaring the two ops it needs when its C++ part cannot load."""
    global _lib
    try:
        import torchvision  # noqa: F401
    except ImportError:
        return
    except RuntimeError:
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        _lib = torch.library.Library("torchvision", "DEF")
        _lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _lib.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision  # noqa: F401


def image_processor(**settings):
    import_torchvision()
    from transformers import Llama4ImageProcessor

    return Llama4ImageProcessor(**settings)


def processor(model_dir, **settings):
    """Llama4Processor over a test checkpoint's tokenizer and preprocessor settings."""
    import_torchvision()
    from transformers import Llama4Processor, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(model_dir)
    return Llama4Processor(image_processor=image_processor(**settings), tokenizer=tok)
