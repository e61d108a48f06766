"""Gate training: data sources, the training loop, checkpoints and recipes (``maskattn-deploy train``).

Entry point: :func:`maskattn_deploy.train.loop.run_training` with a
:class:`maskattn_deploy.train.config.TrainConfig` (``load_train_config(recipe, overrides)``).
Nothing is imported here so that ``import maskattn_deploy.train`` stays light.
"""
