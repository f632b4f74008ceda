"""tledge: fine-tune an ImageNet classifier on a folder of images and put it on an edge device."""

__version__ = "0.1.0"
