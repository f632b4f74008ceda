"""``python -m tledge`` (and ``torchrun -m tledge finetune ...``)."""

from .cli import main

main()
