"""Fine-tuning: the config, the run folder and context, phases and loops, checkpoints, EMA, distributed
helpers and the train-time transforms; ``finetune.finetune(cfg)`` is the entry point."""
