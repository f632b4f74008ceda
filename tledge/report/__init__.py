"""What a run reports: metrics (``metrics``) and plots (``plots``); no torch."""
