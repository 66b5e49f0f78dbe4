"""Engines: training, evaluation, decoding and pretraining runs, built on models/ and utils/.

The layers import one way: utils/ (foundations: errors, files, tasks, data, metrics) <- models/
(the model, its per-task methods, checkpoints) <- engines/ (runs) <- the scripts at the top level."""
