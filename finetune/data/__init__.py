"""The images: scanning folders, decoding, splits, loaders, transforms and test-time crops."""
