"""Faster fine-tuning, decided per machine and recorded (issue 23).

A short probe at run start (:mod:`.probe`, cached per machine in ``$TLEDGE_CACHE/train/choices.json`` by
:mod:`.cache`) decides how the fine-tuning phase trains: precision (:mod:`.choice`: bf16 autocast only with bf16
in hardware), ``torch.compile`` (only where measured to pay), threads, and the exact-math speed-ups (frozen
BatchNorm folded into its convolution, :mod:`.fold`; the fused optimizer step; glibc keeping freed activation
memory, :mod:`.apply`). :mod:`.step` runs each step that way. Validation, checkpoints, export and verification
stay fp32 and unfolded.
"""
