"""The commands' pipelines: train, evaluate, resume, the babysitting tools, sweep."""
