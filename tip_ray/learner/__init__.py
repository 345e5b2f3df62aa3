"""The learner group: DeepSpeed ZeRO ranks that train on the selected tokens."""
