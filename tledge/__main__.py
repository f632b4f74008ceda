"""``python -m tledge`` (and ``torchrun -m tledge finetune ...``)."""

from tledge.cli.main import main

main()
