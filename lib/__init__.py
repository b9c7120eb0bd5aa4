"""Support modules of the scripts: the boundary (checks, files, cli), data, training, evaluation."""
