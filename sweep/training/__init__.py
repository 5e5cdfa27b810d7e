"""Training: CIFAR-10 on the device (data), the CIFAR ResNets (models), the training loop
(train), a trial's checkpoint state (checkpoint; atomic writes on shared folders: atomic), the
divergence listener, and fused packs: K trials as one grouped network (fused, with fused_model,
fused_optim, fused_pack, graphs and fused_bench beside it). Knows nothing of Optuna or MLflow;
imports only the study language below it."""
