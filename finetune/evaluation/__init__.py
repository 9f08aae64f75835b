"""Read val and test once: TTA predictions and the report."""
