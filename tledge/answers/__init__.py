"""What the run's answers mean, fitted on held-out data after fine-tuning (never on the test split): the binary
operating point (``operating_point``). The device applies them through :mod:`tledge_runtime.answers`."""
