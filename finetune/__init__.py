"""finetune: measured transfer learning for image classifiers."""
