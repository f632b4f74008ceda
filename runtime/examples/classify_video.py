"""Classify every frame of a video file (or camera) with a tledge model and report the speed.

    python classify_video.py model.onnx clip.mp4 [--smoothing 0.8] [--batch 4] [--every 10]
    python classify_video.py model.onnx 0          # camera 0

Prints the (smoothed) label every ``--every`` frames and, at the end, frames per
second over the whole run: decoding + preprocessing + inference, what an app gets.
Needs OpenCV: pip install opencv-python-headless.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time

from tledge_runtime import Classifier
from tledge_runtime.errors import TledgeError
from tledge_runtime.video import classify_frames


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help=".onnx or .engine file written by tledge export")
    parser.add_argument("source", help="video file, stream URL, or camera index (a number)")
    parser.add_argument("--device", default="auto", help="auto | cpu | gpu (default: auto)")
    parser.add_argument("--backend", default=None, help="force a backend, e.g. ort-cpu, tensorrt, openvino")
    parser.add_argument("--batch", type=int, default=1, help="frames per inference (default: 1)")
    parser.add_argument("--smoothing", type=float, default=0.0, help="EMA of scores, 0..<1 (default: 0, off)")
    parser.add_argument("--every", type=int, default=1, help="print every N-th frame (default: 1)")
    parser.add_argument("--max-frames", type=int, default=None, help="stop after this many frames")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)

    source = int(args.source) if args.source.isdigit() else args.source
    try:
        with Classifier(args.model, device=args.device, backend=args.backend) as clf:
            start, n = time.perf_counter(), 0
            for result in classify_frames(clf, source, batch_size=args.batch, smoothing=args.smoothing,
                                          max_frames=args.max_frames):
                n += 1
                if result.index % max(args.every, 1) == 0:
                    p = result.prediction
                    fps = n / max(time.perf_counter() - start, 1e-9)
                    print(f"frame {result.index:6d}  {p.label:<20s} {p.score:.3f}  {fps:7.1f} FPS", flush=True)
            elapsed = time.perf_counter() - start
            print(f"{n} frames in {elapsed:.2f} s: {n / max(elapsed, 1e-9):.1f} FPS on {clf.backend_name}")
    except TledgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
