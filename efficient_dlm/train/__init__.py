"""Training: state, optimizer, jitted steps, orbax checkpoints, metrics and the loop.

Public entry points: `loop.train(config) -> TrainResult`, `step.make_train_step(config, model_cfg)`,
`state.create_state` / `state.abstract_state` / `state.state_shardings`.
"""
from efficient_dlm.train import validation  # noqa: F401  (registers config validators)
