"""Training: CIFAR-10 on the device (data), the CIFAR ResNets (models), the training loop
(train) and the divergence listener. Knows nothing of Optuna or MLflow; imports only the study
language below it."""
