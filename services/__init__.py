"""Ray Serve deployments (thin wrappers around library classes). Only this package, jobs/, the Ray Train
entry (distar/ray_train.py) and the remote-reward adapter (distar/remote_reward.py) import Ray."""
