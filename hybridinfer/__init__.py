"""hybridinfer: run giant MoE models on one box, experts on the CPU, attention on the GPU."""

__version__ = "0.1.0"
