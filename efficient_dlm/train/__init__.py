"""Training: state, optimizer, jitted steps, orbax checkpoints, metrics and the loop.

Public entry points: `loop.train(config) -> TrainResult`, `step.make_train_step(diffusion, train, model_cfg)`,
`state.create_state` / `state.abstract_state` / `state.state_shardings`; the typed `init`, `train`
and `opd` config sections live in train/config.py.
"""
